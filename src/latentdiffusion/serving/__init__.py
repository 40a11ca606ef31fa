"""``ldm serve``: an HTTP server around one loaded model (docs/serving.md).

* ``app.create_app(pipe, settings)`` builds the FastAPI application: OpenAI-compatible image routes
  (``openai_api``), AUTOMATIC1111-compatible ``/sdapi/v1`` routes (``a1111_api``), ``/health`` and a
  small offline web page (``web/``).
* ``queue.JobQueue`` owns the model: one worker thread runs requests one at a time from a bounded queue.
* ``settings`` holds the per-request limits; ``names`` maps the sampler names other tools use to ours.

FastAPI and uvicorn are an optional extra (``pip install 'latentdiffusion[serve]'``); nothing here is
imported by ``import latentdiffusion``.
"""
