"""A ComfyUI-compatible API: workflows in ComfyUI's API format, run node by node on this library.

``api`` (HTTP routes), ``ws`` (the progress websocket), ``graph`` (node types, validation, order),
``catalog`` (the node declarations), ``nodes`` (each node a small function), ``sampling`` (KSampler),
``executor`` (a prompt as one job of the server's queue), ``records`` (queue and history), ``files``
(input/output/temp images), ``lora`` (LoRAs merged while a workflow runs), ``names`` (ComfyUI's sampler
and scheduler names). docs/serving.md has the table of routes and nodes.
"""
