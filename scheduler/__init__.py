"""pdserve.scheduler: routing policies (router, simulator) and the controller."""
