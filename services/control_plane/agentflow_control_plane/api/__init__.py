"""HTTP layer: thin routes over the services, one error mapping, auth dependencies."""
