"""The HTTP room: the ASGI layers in front of the inference core (service/http/stack.py says which does what)."""
