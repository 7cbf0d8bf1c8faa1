"""python -m tron.services.agent_host: a user's agent class, started by the tron daemon."""

from tron.common.service import run_service
from tron.services.agent_host.app import make_app

if __name__ == "__main__":
    run_service(make_app)
