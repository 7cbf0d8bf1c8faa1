"""python -m services.llm_sim: the built-in LLM provider, supervised like any agent
(it has /health and beats), started by the tron daemon."""

from common.service import ServiceContext, run_service
from services.llm_sim.app import make_app


def build(ctx: ServiceContext):
    return make_app(token=ctx.token)


if __name__ == "__main__":
    run_service(build)
