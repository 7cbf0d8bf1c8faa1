"""python -m tron.services.gateway: started by the tron daemon, which sets its environment."""

from tron.common.service import run_service
from tron.services.gateway.app import make_app

if __name__ == "__main__":
    run_service(make_app)
