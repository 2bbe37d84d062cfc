"""The policy server: Ray actors in front of an inference engine, and one handle for all replicas.

Rollout workers send small requests (one prompt per environment step) whenever they need
them; the engine batches whatever is in flight, so generation for some environments
overlaps with other environments stepping their games. Each result carries the policy
version of the weights that produced it: a weight update waits for in-flight requests, holds
new ones, loads, and bumps the version. A replica whose weight load failed refuses requests
(its model may be half-loaded) instead of serving them. A replica that Ray restarted after
its process died loads the latest pushed weights before it answers (serving/replicas.py).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Optional

import ray
import torch

from policy_server.engine import Generation, InferenceEngine, Prompt, SamplingParams, per_prompt
from serving.replicas import CatchUp, Replicas, ReplicaUnusable, replica_options, start_latest_version


@dataclass
class GenerateResult:
    generations: list[list[Generation]]  # per prompt, `n` each
    policy_version: int  # the weights that produced them


def engine_threads(policy_cfg: dict) -> int:
    """CPU threads of a replica's engine: `policy.torch_threads`, else its Ray CPUs (at least 1)."""
    return max(1, policy_cfg["torch_threads"] or int(policy_cfg["num_cpus"]))


def make_engine(model_path: str, engine: str, policy_cfg: dict, seed: int) -> InferenceEngine:
    """The configured engine (`policy.engine`); vLLM is imported only when asked for."""
    from serving.devices import pick_device, pick_dtype

    device = pick_device(policy_cfg["device"] if engine == "hf" else "auto")  # vLLM: its build decides
    if engine == "vllm" and device.type == "cuda" and policy_cfg["dtype"] == "auto":
        dtype = "auto"  # vLLM's own: a 16-bit type its GPU supports, chosen without CUDA in this process
    else:
        dtype = str(pick_dtype(policy_cfg["dtype"], device)).removeprefix("torch.")
    print(f"policy server: {engine} engine, {dtype} on {device.type}, {model_path}", flush=True)
    if engine == "vllm":
        from policy_server.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, dtype=dtype, trust_remote_code=policy_cfg["trust_remote_code"],
                          seed=seed, served_model_name=policy_cfg["model"], cpu_threads=engine_threads(policy_cfg),
                          **policy_cfg["vllm"])
    if engine == "hf":
        from policy_server.hf_engine import BatchingHFEngine, HFEngine

        hf = HFEngine(model_path, device=policy_cfg["device"], dtype=dtype,
                      trust_remote_code=policy_cfg["trust_remote_code"], seed=seed)
        return BatchingHFEngine(hf, max_batch_size=policy_cfg["max_batch_size"],
                                batch_wait_ms=policy_cfg["batch_wait_ms"])
    raise ValueError(f"unknown engine {engine!r}")


class PolicyServer:
    """One replica. Use through `start_policy_servers`, which returns a `PolicyClient`.
    `latest`: the service's `LatestVersion`, whose weights (if any were pushed) the replica
    loads before its first answer, so a restarted replica serves what the others serve.
    `openai_port`: start the OpenAI-compatible endpoint there (0: any free port; None: not
    until `serve_openai`); started by the constructor, a restarted replica's comes back too."""

    def __init__(self, model_path: str, policy_cfg: dict, seed: int = 0, latest=None,
                 openai_port: Optional[int] = None):
        torch.set_num_threads(engine_threads(policy_cfg))
        self.model_path = model_path
        self.served_model_name = policy_cfg["model"]
        self.engine = make_engine(model_path, policy_cfg["engine"], policy_cfg, seed)
        self.version = 0
        self._accepting = asyncio.Event()  # cleared while weights are being replaced
        self._accepting.set()
        self._idle = asyncio.Event()  # set when no generation is in flight
        self._idle.set()
        self._in_flight = 0
        self._update_lock = asyncio.Lock()
        self._broken: str | None = None  # why this replica refuses requests
        self._latest = latest
        self._catch_up = CatchUp(latest, self._update_lock, "policy server")
        self._openai: Optional[asyncio.Task] = None  # starts the endpoint; its result is the Endpoint
        if openai_port is not None:  # (an async actor's constructor runs on its event loop)
            self._openai = asyncio.get_running_loop().create_task(self._start_openai(openai_port))

    async def _load_latest(self, version: int, weights: dict[str, torch.Tensor] | None) -> None:
        """A restarted replica's catch-up (under the update lock). Weights streamed by vLLM's
        sync protocol are not kept: after such an update the replica refuses requests rather
        than serve its initial weights."""
        if weights is None:
            self._broken = f"restarted after weight version {version}, which was streamed and not kept"
            raise ReplicaUnusable(f"policy server replica unusable: {self._broken}")
        await self._hold_requests()
        try:
            await self._load(weights, version)
        finally:
            self._accepting.set()

    async def generate(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams]) -> GenerateResult:
        """`params` is one SamplingParams for all prompts, or one per prompt; a prompt is
        text or token ids (used as given)."""
        params = per_prompt(params, len(prompts))
        await self._catch_up(self.version, self._load_latest)
        await self._accepting.wait()
        if self._broken:
            raise ReplicaUnusable(f"policy server replica unusable: {self._broken}")
        self._in_flight += 1
        self._idle.clear()
        version = self.version  # updates wait for in-flight requests, so this stays true
        try:
            return GenerateResult(await self.engine.generate(prompts, params), version)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Load new weights in place; generations after this report `version`."""
        await self._catch_up(self.version, self._load_latest)
        async with self._update_lock:
            await self._hold_requests()
            try:
                await self._load(state_dict, version)
            finally:
                self._accepting.set()
        return version

    async def _load(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        try:
            await self.engine.load_weights(state_dict)
            self.version = version
        except BaseException as e:
            self._broken = f"loading weights version {version} failed: {e!r}"
            raise

    async def _hold_requests(self) -> None:
        self._accepting.clear()
        await self._idle.wait()

    # vLLM's weight-sync protocol, for trainers that stream weights with vLLM's own transfer
    # engines (NCCL on GPU: `WeightTransferTrainerFactory` + `RayVLLMWeightSyncClient(handles)`).
    # Between start and finish the replica holds new requests. That client sets the version
    # only after `finish`, so `finish` already stamps the next one (version + 1): trainers
    # number their versions consecutively.
    async def init_weight_transfer_engine(self, request) -> None:
        await self._vllm().llm.init_weight_transfer_engine(request)

    async def shutdown_weight_transfer_engine(self) -> None:
        await self._vllm().llm.shutdown_weight_transfer_engine()

    async def start_weight_update(self) -> None:
        await self._update_lock.acquire()
        try:
            await self._hold_requests()
            await self._vllm().begin_weight_update()
        except BaseException:
            self._accepting.set()
            self._update_lock.release()
            raise

    async def update_weights(self, request) -> None:
        try:
            await self._vllm().llm.update_weights(request)
        except BaseException as e:
            self._broken = f"a weight update failed: {e!r}"
            raise

    async def finish_weight_update(self) -> None:
        try:
            await self._vllm().end_weight_update()
            self.version += 1
            if self._latest is not None:  # the version alone: a replica restarted later refuses to serve
                await self._latest.keep.remote(self.version, None)
        except BaseException as e:
            self._broken = f"finishing a weight update failed: {e!r}"
            raise
        finally:
            self._accepting.set()
            self._update_lock.release()

    async def update_weight_version(self, version: str) -> None:
        self.version = int(version)
        await self._vllm().llm.update_weight_version(version)

    def _vllm(self):
        if self.engine.name != "vllm":
            raise RuntimeError("vLLM's weight-sync protocol needs policy.engine=vllm; use load_weights")
        return self.engine

    async def serve_openai(self, port: int = 0) -> str:
        """The base URL of the OpenAI-compatible endpoint on loopback, started on `port` unless
        it already runs."""
        if self._openai is None:
            self._openai = asyncio.create_task(self._start_openai(port))
        return (await self._openai).url

    async def _start_openai(self, port: int):
        from policy_server import openai_api

        await self._catch_up(self.version, self._load_latest)  # vLLM's server skips `generate`'s
        if self.engine.name == "vllm":  # vLLM's own server, on this replica's engine
            endpoint = await openai_api.serve_vllm(self.engine.llm, self.model_path, self.served_model_name, port)
        else:
            endpoint = await openai_api.serve_policy(self.generate, self.engine.tokenizer, self.served_model_name,
                                                     port)
        print(f"policy server: OpenAI-compatible endpoint at {endpoint.url}", flush=True)
        return endpoint

    async def get_version(self) -> int:
        await self._catch_up(self.version, self._load_latest)
        return self.version

    def get_stats(self) -> dict[str, int]:
        return {**self.engine.stats(), "in_flight": self._in_flight}

    async def shutdown(self) -> None:
        """Stop the endpoint and the engine's own processes (vLLM) before the actor goes."""
        if self._openai is not None:
            try:
                endpoint = await self._openai
            except Exception:  # it never started (its error went to `serve_openai`): nothing to stop
                endpoint = None
            if endpoint is not None:
                await endpoint.stop()
        self.engine.shutdown()


@dataclass
class PolicyClient(Replicas):
    """All policy server replicas behind one handle; picklable, so rollout workers hold one.

    A request with a `session` (an episode id) always goes to the same replica, so an
    episode's prompts, which share their history, hit that replica's prefix cache; requests
    without one are spread round-robin. Weight loads go to every replica.
    """

    def generate(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams],
                 session: Optional[str] = None) -> ray.ObjectRef:
        """An ObjectRef of a `GenerateResult` (await it in async code, ray.get it elsewhere)."""
        return self.servers[self.replica_for(session)].generate.remote(prompts, params)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int, timeout_s: float = 600) -> None:
        """Every replica loads `state_dict` (put in the object store once) and reports `version`;
        the weights are kept first, for replicas restarted later, even under a lower version
        than the kept one (a learner resumed from a checkpoint: its weights are the ones now)."""
        weights = ray.put(state_dict)
        self.keep_latest(version, weights, timeout_s, replace=True)
        self.call_all("load_weights", weights, version, timeout_s=timeout_s)

    def versions(self) -> list[int]:
        return self.call_all("get_version")

    def stats(self) -> list[dict[str, int]]:
        return self.call_all("get_stats")

    def serve_openai(self, port: int = 0) -> list[str]:
        """Each replica's endpoint URL (replica i on `port + i`; 0 = any free port)."""
        return ray.get([s.serve_openai.remote(replica_port(port, i)) for i, s in enumerate(self.servers)],
                       timeout=300)

    def wait_ready(self, timeout_s: float = 900) -> None:
        self.call_all("__ray_ready__", timeout_s=timeout_s)


def replica_port(port: int, replica: int) -> int:
    """The OpenAI endpoint port of replica `replica`: `port` + its index (0 stays 0: any free port)."""
    return port + replica if port else 0


def start_policy_servers(policy_cfg: Any, model_path: str, seed: int) -> PolicyClient:
    """`policy.replicas` server actors with the configured resources, behind one `PolicyClient`;
    each is restarted up to `policy.max_restarts` times."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(policy_cfg, resolve=True) if not isinstance(policy_cfg, dict) else policy_cfg
    actor = ray.remote(PolicyServer).options(
        num_cpus=cfg["num_cpus"], num_gpus=cfg["num_gpus"], resources=dict(cfg["resources"]),
        # Requests held during a weight update occupy slots; the update's own calls need free ones.
        max_concurrency=100_000, **replica_options(cfg["max_restarts"]),
    )
    latest = start_latest_version()
    port = cfg["openai_port"]
    ports = [None if port is None else replica_port(port, i) for i in range(cfg["replicas"])]
    client = PolicyClient([actor.remote(model_path, cfg, seed + i, latest, p) for i, p in enumerate(ports)], latest)
    if port is not None:
        client.wait_ready()
        client.serve_openai(port)  # returns once every endpoint is up
    return client
