"""python -m tron.services.llm_sim: the built-in LLM provider, supervised like any agent
(it has /health and beats), started by the tron daemon."""

from tron.common.service import ServiceContext, run_service
from tron.services.llm_sim.app import make_app


def build(ctx: ServiceContext):
    # The sim answers unknown models with 404 like the real APIs; the models this mesh
    # is configured to use must never be unknown to it.
    providers = ctx.config.providers
    return make_app(token=ctx.token, models={"anthropic": [providers.anthropic_model],
                                             "ollama": [providers.ollama_model]})


if __name__ == "__main__":
    run_service(build)
