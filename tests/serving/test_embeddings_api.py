"""Textual-inversion embeddings in the AUTOMATIC1111 API: ``GET /sdapi/v1/embeddings`` lists the loaded
ones, and an image whose prompt uses one names it in its PNG info (``TI hashes``)."""

from __future__ import annotations

import base64
import hashlib
import io

import httpx
import torch
from PIL import Image
from safetensors.torch import save_file

from .conftest import running_server


def test_embeddings_are_listed_and_named_in_png_info(tmp_path):
    import latentdiffusion as ld

    pipe = ld.load("preset:tiny")
    path = tmp_path / "my-style.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, path)
    pipe.load_embeddings(tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    with running_server(pipe) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        listed = http.get("/sdapi/v1/embeddings").json()
        assert listed == {
            "loaded": {
                "my-style": {
                    "step": None,
                    "sd_checkpoint": None,
                    "sd_checkpoint_name": None,
                    "shape": 32,
                    "vectors": 2,
                }
            },
            "skipped": {},
        }
        body = {"prompt": "a house, (my-style:1.2)", "steps": 1, "width": 32, "height": 32}
        image = http.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
    info = Image.open(io.BytesIO(base64.b64decode(image))).info["parameters"]
    assert f'TI hashes: "my-style: {digest}"' in info
