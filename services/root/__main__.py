"""python -m tron.services.root: started by the tron daemon, which sets its environment."""

from tron.common.service import run_service
from tron.services.root.app import make_app

if __name__ == "__main__":
    run_service(make_app)
