"""The inference room: the served models (the worker's model repository), one entry point from a request's images
to their answers, the batcher, the cores the workers share and the model-call metrics. It knows nothing of HTTP."""
