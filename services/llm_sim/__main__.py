"""python -m tron.services.llm_sim: the built-in LLM provider, supervised like any agent
(it has /health and beats), started by the tron daemon."""

from tron.common import providers
from tron.common.service import ServiceContext, run_service
from tron.services.llm_sim.app import make_app


def build(ctx: ServiceContext):
    # The sim answers unknown models with 404 like the real APIs; the models this mesh
    # is configured to use must never be unknown to it.
    # Each registered provider's model goes to the API of the sim that stands in for it.
    models: dict[str, list[str]] = {}
    for name in providers.names():
        models.setdefault(providers.get(name).sim_surface, []).append(ctx.config.providers.model_of(name))
    return make_app(token=ctx.token, models=models)


if __name__ == "__main__":
    run_service(build)
