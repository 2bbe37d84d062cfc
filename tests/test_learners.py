"""SFT on Ray Train: loss masks, two DeepSpeed (ZeRO-2) workers on a tiny model, resume after a
failure, the exported policy in the policy server, the plain-DDP baseline and bf16 autocast."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omegaconf import OmegaConf

from learners import IGNORE, TokenizedExample, pack, train_sft
from learners.data import response_nll
from learners.export import export_checkpoint
from learners.trainer import LAST_CHECKPOINT
from policy_server import SamplingParams, start_policy_servers
from tests.conftest import small_cfg


@pytest.fixture(scope="module")
def demos(tiny_model, ood_games, tmp_path_factory):
    """The expert's first 2 steps in 4 real games, as a demos.parquet of step records."""
    import asyncio

    from omegaconf import OmegaConf

    from rollout_workers import SCHEMA, EpisodeTask, RolloutWorker

    worker = RolloutWorker(0, 1, "expert", tiny_model, max_steps=2, prompt=OmegaConf.to_container(small_cfg().prompt),
                           policy=None)
    steps = [s for game in ood_games[:4] for s in asyncio.run(worker.play(EpisodeTask(game, 0, seed=0)))]
    path = tmp_path_factory.mktemp("demos") / "demos.parquet"
    pq.write_table(pa.Table.from_pylist([vars(s) for s in steps], schema=SCHEMA), path)
    return path


def sft_cfg(**overrides):
    # 4 episodes, a batch of 4: every step sees the same fixed batch
    return small_cfg(**{"learner.num_workers": 2, "sft.batch_size": 4, "sft.micro_batch_size": 1,
                        "sft.lr": 3e-3, "sft.warmup_steps": 1, "sft.epochs": 6, **overrides})


def losses(out_dir) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # each step once, in order
    return [r["loss"] for r in records]


def test_sft_loss_without_prompt_logits_equals_the_causal_lms_own(tiny_model):
    # Prompts of different lengths, so the rows' response positions differ.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = ["<|im_start|>user\nYour task is to: look.<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nYour task is to: put a clean mug in the coffeemachine.<|im_end|>\n"
               "<|im_start|>assistant\n"]
    examples = []
    for prompt, response in zip(prompts, ("ACTION: look", "ACTION: go to shelf 1")):
        prompt_ids, response_ids = tokenizer.encode(prompt), tokenizer.encode(response) + [tokenizer.eos_token_id]
        examples.append(TokenizedExample(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids))
    batch = pack(examples)
    ours = response_nll(model, batch)
    theirs = model(**batch, use_cache=False).loss  # packed: without a cache, position_ids mark the sequences
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    ours.backward()
    ours_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    theirs.backward()
    theirs_grad = model.model.embed_tokens.weight.grad
    # float32 sums in another order: equal to 1e-5 of the largest entry, not bit for bit
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-5 * theirs_grad.abs().max().item())


def test_worker_shares_split_each_step_by_length_and_lose_nothing(monkeypatch):
    import torch.distributed as dist

    from learners.trainer import step_batch, worker_share

    examples = [" " * n for n in (700, 250, 512, 300, 810, 400, 260, 640, 333, 590, 475, 720)]
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        shares.append(worker_share(examples, 8, seed=0, length=len))
    for step in (1, 2, 3):  # crosses an epoch boundary
        mine, theirs = shares[0](step), shares[1](step)
        assert sorted(mine + theirs) == sorted(step_batch(examples, step, 8, 0))  # the step's examples, once each
        # Micro-batches of 2: the ranks' i-th micro-batches are neighbours in length.
        ordered = sorted(mine + theirs, key=len)
        for i in range(0, 4, 2):
            assert {len(x) for x in mine[i:i + 2] + theirs[i:i + 2]} == {len(x) for x in ordered[2 * i:2 * i + 4]}


def test_sft_with_deepspeed_zero2_lowers_the_loss_and_exports_a_servable_policy(ray_local, tiny_model, demos,
                                                                               tmp_path):
    cfg = sft_cfg(**{"learner.backend": "deepspeed", "learner.zero_stage": 2})
    policy_dir = train_sft(cfg, demos, tiny_model, tmp_path / "sft")
    trace = losses(tmp_path / "sft")
    assert len(trace) == 6 and trace[-1] < 0.5 * trace[0]
    assert list((tmp_path / "sft" / "tensorboard").glob("events.out.tfevents.*"))
    assert (policy_dir / "model.safetensors").is_file() and (policy_dir / "tokenizer.json").is_file()
    # The last checkpoint (step 6, ZeRO shards, as recorded in the learner's folder) exported
    # by hand holds the same weights.
    checkpoint = Path(json.loads((tmp_path / "sft" / LAST_CHECKPOINT).read_text())["path"])
    assert checkpoint.parent == (tmp_path / "sft" / "ray_train" / "sft").resolve()
    assert export_checkpoint(checkpoint, tiny_model, tmp_path / "exported")["step"] == 6
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    finished = AutoModelForCausalLM.from_pretrained(policy_dir).state_dict()
    assert exported.keys() == finished.keys() and all(torch.equal(exported[k], finished[k]) for k in finished)
    # the exported model gives the demonstrations' responses a higher likelihood than the base model
    assert demo_loss(str(policy_dir), demos) < 0.5 * demo_loss(tiny_model, demos)
    policy = start_policy_servers(small_cfg(**{"policy.device": "cpu"}).policy, str(policy_dir), seed=0)
    prompt = pq.read_table(demos)["prompt"][0].as_py()
    (gen,), = ray.get(policy.generate([prompt], SamplingParams(max_tokens=12)), timeout=120).generations
    assert gen.token_ids and ray.get(policy.servers[0].get_version.remote(), timeout=60) == 0
    policy.shutdown()


def demo_loss(model_path: str, demos) -> float:
    """Mean response-token loss of a Hugging Face folder on the demonstrations' episodes."""
    import torch
    from transformers import AutoModelForCausalLM

    from agent.episode import ChatFormat
    from learners.data import episode_sequences, pack

    sequences, _ = episode_sequences(pq.read_table(demos), ChatFormat(AutoTokenizer.from_pretrained(model_path)),
                                     OmegaConf.to_container(small_cfg().prompt), max_new_tokens=48)
    with torch.no_grad():
        return response_nll(AutoModelForCausalLM.from_pretrained(model_path), pack(sequences)).item()


def test_sft_resumes_from_its_checkpoint_after_a_failure(ray_local, tiny_model, demos, tmp_path):
    """The job fails once at step 3 and restarts from the step-2 checkpoint; it must then train
    exactly like a run that never failed (same weights, optimizer state, learning rate and
    batches: 4 examples, batches of 2)."""
    common = {"sft.batch_size": 2, "sft.checkpoint_every": 2, "sft.max_steps": 5}
    train_sft(sft_cfg(**common), demos, tiny_model, tmp_path / "straight")
    failing = sft_cfg(**common, **{"learner.fail_at_step": 3, "learner.max_failures": 1})
    train_sft(failing, demos, tiny_model, tmp_path / "resumed")
    assert (tmp_path / "resumed/injected_failure").read_text() == "step 3\n"  # it did fail
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-4)
    assert len(losses(tmp_path / "resumed")) == 5
    # A crashed job (no restarts left) continues from its checkpoint when it is run again.
    crashing = sft_cfg(**common, **{"learner.fail_at_step": 3, "learner.max_failures": 0})
    with pytest.raises(Exception, match="injected failure at step 3"):
        train_sft(crashing, demos, tiny_model, tmp_path / "rerun")
    train_sft(sft_cfg(**common), demos, tiny_model, tmp_path / "rerun")
    assert losses(tmp_path / "rerun") == pytest.approx(losses(tmp_path / "straight"), rel=1e-4)


def test_sft_with_plain_ddp(ray_local, tiny_model, demos, tmp_path):
    policy_dir = train_sft(sft_cfg(**{"learner.backend": "ddp"}), demos, tiny_model, tmp_path / "sft")
    trace = losses(tmp_path / "sft")
    assert trace[-1] < 0.5 * trace[0] and (policy_dir / "model.safetensors").is_file()


def test_sft_under_bf16_autocast_learns_and_keeps_float32_weights(ray_local, tiny_model, demos, tmp_path):
    """learner.autocast_bf16: the same batches as float32 give a loss a little apart (the
    products ran in bfloat16), it still falls, and the exported weights are float32."""
    from safetensors import safe_open

    common = {"learner.backend": "ddp", "sft.max_steps": 4}
    train_sft(sft_cfg(**common), demos, tiny_model, tmp_path / "float32")
    policy_dir = train_sft(sft_cfg(**common, **{"learner.autocast_bf16": True}), demos, tiny_model,
                           tmp_path / "autocast")
    float32, mixed = losses(tmp_path / "float32"), losses(tmp_path / "autocast")
    # float32 runs agree to 1e-4 (the resume test); bfloat16 products moved it by 9e-4 here
    assert 3e-4 < abs(mixed[0] / float32[0] - 1) < 0.02
    assert mixed[-1] < 0.7 * mixed[0]
    with safe_open(str(policy_dir / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_deepspeed_export_does_not_drag_the_flat_parameter_buffer():
    """Under ZeRO the parameters are views into one flat buffer; the exported weights must
    not be, or sending them to the policy server serialises the whole buffer per tensor."""
    import pickle
    import socket

    import torch
    import torch.distributed as dist

    from learners.engines import DeepSpeedEngine

    flat = torch.zeros(100_000)
    model = torch.nn.Linear(10, 10)
    model.weight.data, model.bias.data = flat[:100].view(10, 10), flat[100:110]
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # only the export, on a flat buffer like ZeRO's
    engine.zero_stage, engine.module = 2, model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        state = engine.export_state_dict()
    finally:
        dist.destroy_process_group()
    assert torch.equal(state["weight"], model.weight) and torch.equal(state["bias"], model.bias)
    assert len(pickle.dumps(state)) < 10_000 < len(pickle.dumps(model.state_dict()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed's CPU ops are built on CPU machines only")
def test_cpu_ops_build_in_the_environments_folder_past_a_stale_lock():
    """Set-up's build lands where learner workers load it from (this environment's folder, not
    torch's shared default), and a lock left by a build killed midway does not hang it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    folder = Path(sys.prefix, "torch_extensions", "deepspeed_shm_comm")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").touch()  # what a killed build leaves behind
    script = ("from learners.engines import build_cpu_ops, use_environment_extensions_dir; "
              "build_cpu_ops(); print(use_environment_extensions_dir())")
    try:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    finally:
        lock_left = (folder / "lock").exists()
        (folder / "lock").unlink(missing_ok=True)  # else every later learner in this environment would wait on it
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(folder.parent)
    assert (folder / "deepspeed_shm_comm.so").is_file() and not lock_left


def test_a_fixed_mmap_threshold_gives_freed_activations_back():
    """Tensors of 1-7 MiB freed around a few survivors, three times over, as activations of
    steps of varying lengths are: with the learners' fixed threshold the process's resident
    memory returns to where it was, plus the survivors."""
    import subprocess
    import sys

    script = """
import os, torch
from learners.trainer import fix_malloc_mmap_threshold

def resident_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9

fix_malloc_mmap_threshold(128)
torch.ones(1)
before, kept = resident_gb(), []
for _ in range(3):
    tensors = [torch.ones(256 * 1024 * (1 + i % 7)) for i in range(200)]  # 1-7 MiB each, 0.8 GB
    kept += tensors[::50]
    del tensors
print(resident_gb() - before, sum(t.numel() * 4 for t in kept) / 1e9)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    grown, kept = map(float, done.stdout.split())
    assert grown < kept + 0.1  # at glibc's default threshold: 0.65-0.86 GB more


def test_a_learner_group_whose_worker_died_starting_is_started_again_up_to_max_failures(capsys):
    """Ray Train does not retry a worker that dies while its group starts (a controller
    error); the learner does, as many times as learner.max_failures, and a failure for good
    is one line."""
    import ray.exceptions
    import ray.train

    from learners.trainer import fit_again_after_startup_deaths, learner_failure

    def fit_failing(times: int, failure: Exception):
        calls = []

        def fit():
            calls.append(1)
            if len(calls) <= times:
                raise ray.train.ControllerError(failure)
        return fit, calls

    died = ray.exceptions.ActorDiedError()
    fit, calls = fit_failing(2, died)
    fit_again_after_startup_deaths(fit, max_failures=3, name="dpo")
    assert len(calls) == 3 and "dpo: a learner worker died while its group started" in capsys.readouterr().out
    fit, calls = fit_failing(5, died)
    with pytest.raises(ray.train.ControllerError) as info:
        fit_again_after_startup_deaths(fit, max_failures=1, name="dpo")
    assert len(calls) == 2
    line = learner_failure(info.value)
    assert line.startswith("the learner job failed (Training failed due to controller error") and "\n" not in line
    fit, calls = fit_failing(1, ValueError("a bug"))  # not a death: no retry
    with pytest.raises(ray.train.ControllerError):
        fit_again_after_startup_deaths(fit, max_failures=3, name="dpo")
    assert len(calls) == 1 and learner_failure(ValueError("x")) is None
