"""A stand-in for vLLM's OpenAI-compatible server on loopback, for the tests that have no vLLM: /v1/models,
/tokenize and /v1/completions with prompt_logprobs, answered in vLLM 0.32's format (per prompt position after the
first, which is null, {id: {logprob, rank, decoded_token}} for the top k and the position's actual token, the
log-softmax of the raw logits at temperature 1) by a kltd model in this process."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def prompt_logprobs(model, ids: list[int], k: int) -> list:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    out: list = [None]
    for position in range(1, len(ids)):
        row, actual = logp[position - 1], ids[position]
        top = row.topk(row.shape[-1] if k == -1 else k)
        entry = {str(int(actual)): {"logprob": float(row[actual]), "rank": int((row > row[actual]).sum()) + 1,
                                     "decoded_token": ""}}
        for rank, (token, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            entry[str(token)] = {"logprob": float(value), "rank": rank, "decoded_token": ""}
        out.append(entry)
    return out


def serve(name: str):
    """(server, its /v1 URL) for the model `name` (kltd.train.models.load_model's reference)."""
    from kltd.train.models import load_model, load_tokenizer

    model, tokenizer = load_model(name), load_tokenizer(name)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002
            pass

        def _send(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": name, "root": name, "max_model_len": 128}]})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                ids = tokenizer(request["prompt"], add_special_tokens=request.get("add_special_tokens", True))
                self._send({"tokens": ids["input_ids"], "count": len(ids["input_ids"]), "max_model_len": 128})
                return
            prompts = request["prompt"] if isinstance(request["prompt"][0], list) else [request["prompt"]]
            self._send({"choices": [{"index": i, "text": "", "prompt_logprobs":
                                     prompt_logprobs(model, ids, request["prompt_logprobs"])}
                                    for i, ids in enumerate(prompts)]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"
