"""The Open Inference Protocol over gRPC (server.py), under the same limits as the HTTP routes (calls.py)."""
