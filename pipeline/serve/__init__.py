"""The query service: pipeline.query's extraction, search and verification as Ray Serve deployments
behind an HTTP gateway (pipeline.serve.app), following the live index version (pipeline.serve.versions)."""
