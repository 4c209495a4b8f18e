"""The Flower runtime: the same wire messages as the in-process runtime, carried by Flower's Message API.

payload.py     WireMessage and client reports <-> Flower RecordDict
client_app.py  ClientApp: train + upload, adopt the enhanced SLM, evaluate (state on the node's disk)
server_app.py  ServerApp: the asynchronous push/pull loop around CrossLMServer, with checkpoints
deploy.py      certificates, node keys and the loopback deployment (SuperLink + K SuperNodes)
app/           the Flower App (pyproject.toml) that `flwr run` submits
"""
