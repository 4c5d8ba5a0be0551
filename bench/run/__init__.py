"""Running suites: a TOML suite expanded into trials (suite.py), run one process each and resumable
(runner.py, or ray_backend.py on a Ray cluster), each trial forked from a preloaded server
(forkserver.py) and done by worker.py."""
