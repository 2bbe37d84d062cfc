"""An OpenAI-compatible HTTP endpoint on loopback for the current policy.

Standard clients (the `openai` package, curl, evaluation harnesses) can then talk to the
policy being trained. With the vLLM engine this is vLLM's own OpenAI server, mounted on the
replica's running engine; with the transformers engine it is a small server for the
`/v1/models`, `/v1/completions` and `/v1/chat/completions` routes (no streaming).
Both listen on 127.0.0.1 only: reach them from elsewhere through an SSH tunnel.
"""
from __future__ import annotations

import asyncio
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable

from policy_server.engine import SamplingParams

HOST = "127.0.0.1"


@dataclass
class Endpoint:
    url: str  # base URL for OpenAI clients, ending in /v1
    stop: Callable[[], Awaitable[None]]


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    return sock


async def serve_vllm(llm, model_path: str, served_model_name: str, port: int = 0) -> Endpoint:
    """vLLM's OpenAI server app on an existing `AsyncLLM`."""
    import uvicorn
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    sock = _bind(port)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", model_path, "--served-model-name", served_model_name, "--host", HOST,
         "--port", str(sock.getsockname()[1]), "--disable-log-stats"])
    tasks = await llm.get_supported_tasks()
    app = build_app(args, tasks, llm.model_config)
    await init_app_state(llm, app.state, args, tasks)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))

    async def stop() -> None:
        server.should_exit = True
        await task

    return Endpoint(f"http://{HOST}:{sock.getsockname()[1]}/v1", stop)


GenerateFn = Callable[[list[str], list[SamplingParams]], Awaitable]


async def serve_policy(generate: GenerateFn, tokenizer, served_model_name: str, port: int = 0) -> Endpoint:
    """A minimal OpenAI server over the policy server's own `generate` (transformers engine)."""
    from aiohttp import web

    def sampling(body: dict, default_max_tokens: int) -> SamplingParams:
        stop = body.get("stop") or ()
        return SamplingParams(n=int(body.get("n", 1)), temperature=float(body.get("temperature", 1.0)),
                              top_p=float(body.get("top_p", 1.0)),
                              max_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens")
                                             or default_max_tokens),
                              stop=(stop,) if isinstance(stop, str) else tuple(stop), seed=body.get("seed"))

    def response(kind: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> web.Response:
        return web.json_response({
            "id": f"{kind}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": served_model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})

    def check_model(body: dict) -> None:
        if body.get("model") not in (None, served_model_name):
            raise web.HTTPNotFound(text=f"unknown model {body.get('model')!r}; this server has {served_model_name!r}")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": served_model_name, "object": "model", "created": 0, "owned_by": "agentprm"}]})

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        check_model(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        params = sampling(body, default_max_tokens=16)
        result = await generate(prompts, [params] * len(prompts))
        choices = [{"index": i * params.n + j, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}
                   for i, gens in enumerate(result.generations) for j, g in enumerate(gens)]
        used = sum(len(g.token_ids) for gens in result.generations for g in gens)
        return response("text_completion", choices, sum(len(tokenizer.encode(p)) for p in prompts), used)

    async def chat_completions(request: web.Request) -> web.Response:
        body = await request.json()
        check_model(body)
        prompt = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        result = await generate([prompt], [sampling(body, default_max_tokens=256)])
        choices = [{"index": j, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                    "finish_reason": g.finish_reason} for j, g in enumerate(result.generations[0])]
        used = sum(len(g.token_ids) for g in result.generations[0])
        return response("chat.completion", choices, len(tokenizer.encode(prompt)), used)

    app = web.Application()
    app.add_routes([web.get("/v1/models", models), web.post("/v1/completions", completions),
                    web.post("/v1/chat/completions", chat_completions)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = _bind(port)
    await web.SockSite(runner, sock).start()
    return Endpoint(f"http://{HOST}:{sock.getsockname()[1]}/v1", runner.cleanup)
