"""``spmd-lora dashboard RUN_DIR [RUN_DIR ...]``: a live local web page of training runs.

* ``runs.py`` reads a run directory (metrics, resolved config, census, checkpoints, log);
* ``launcher.py`` turns the page's "new run" form into a config file and a child
  ``spmd-lora train`` process;
* ``generation.py`` answers the prompt box with ``spmd-lora generate`` on a run's adapter;
* ``server.py`` serves the page and its JSON endpoints (standard-library HTTP server, bound to
  127.0.0.1 unless told otherwise; URLs never name files, so nothing outside the runs is served);
* ``static/`` holds the page: hand-written SVG charts, no CDN, works offline.
"""
