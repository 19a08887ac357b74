"""Process-group runtime: NCCL on GPUs, gloo on CPU, megatron's model-parallel groups, seeds.

Works under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK set) and as a plain single process.
"""
from __future__ import annotations

import contextlib

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from engine.layout_rules import check_layout


@dataclass
class Runtime:
    """This process's place in the TP x PP x DP grid and its process groups.

    `groups` is megatron's ProcessGroupCollection, taken once from parallel_state when the runtime
    starts; everything downstream (model, DDP, optimizer, schedules, loss reductions) receives its
    groups from here instead of reading megatron's globals.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    dp: int
    vpp: int | None
    groups: object = None  # megatron.core.process_groups_config.ProcessGroupCollection

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp_rank(self) -> int:
        return self.groups.tp.rank()

    @property
    def pp_rank(self) -> int:
        return self.groups.pp.rank()

    @property
    def dp_rank(self) -> int:
        return self.groups.dp.rank()

    def is_first_stage(self, vp_stage: int | None = None) -> bool:
        """First pipeline stage (of model chunk vp_stage with interleaving; None: of this rank)."""
        return self.pp_rank == 0 and (vp_stage is None or vp_stage == 0)

    def is_last_stage(self, vp_stage: int | None = None) -> bool:
        return self.pp_rank == self.pp - 1 and (vp_stage is None or vp_stage == (self.vpp or 1) - 1)


def validate_layout(model: ModelConfig, par: ParallelConfig, train: TrainConfig, world_size: int,
                    seq_length: int) -> int:
    """Check the parallel layout against the model, batch and packed length (data.seq_length)
    (engine.layout_rules.check_layout), then the backbone and FP8 settings against this machine;
    returns the data-parallel size."""
    dp = check_layout(model, par, train, world_size, seq_length)
    from engine.fp8 import check_start_up

    check_start_up(model, par, train)  # model.transformer_impl and train.fp8 against this machine
    return dp


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _local_device(hosted: bool) -> int:
    """This rank's CUDA device index (LOCAL_RANK without CUDA): LOCAL_RANK, or, in a process group
    another program started, the device that program made current."""
    if hosted and torch.cuda.is_available():
        return torch.cuda.current_device()
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_runtime(par: ParallelConfig, seed: int) -> Runtime:
    """Start torch.distributed and megatron's parallel state. Call validate_layout first.
    In a process whose process group another program started (an RL trainer's worker with the reward
    model beside it: engine.inference), that program's group, ranks and CUDA device are taken as they
    are, and its process is left as it is (no launcher death signal, no stdout/stderr wrappers): a Ray
    worker may have no RANK in its environment (every rank took itself for rank 0) and see one GPU
    whatever its LOCAL_RANK (set_device(LOCAL_RANK) failed there)."""
    from engine.closed_pipe import outlive_lost_readers

    hosted = dist.is_initialized()
    if hosted:
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        end_with_launcher()
        outlive_lost_readers()  # a `| tee` that ends (a closed login) does not end the run with it
        rank, world = int(os.environ.get("RANK", "0")), world_size_from_env()
    local_rank = _local_device(hosted)
    if torch.cuda.is_available():
        if not hosted:
            torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        from engine import cpu_compat
        from engine.quiet import silence_cpu_warnings

        cpu_compat.apply()
        silence_cpu_warnings()  # megatron's CUDA-only hints (engine/quiet.py)
        device = torch.device("cpu")
        backend = "gloo"
    timeout = datetime.timedelta(minutes=par.timeout_minutes)
    if not hosted:
        if world == 1 and "MASTER_ADDR" not in os.environ:
            # a plain single process: an in-memory store, no TCP port to race other processes for
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)

    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        distributed_timeout_minutes=par.timeout_minutes,
    )
    # The one place megatron's globals are read: from here on the groups are passed along.
    groups = ProcessGroupCollection.use_mpu_process_groups()
    seed_model_parallel(device, seed, groups.tp.rank())
    return Runtime(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=device,
        tp=par.tp,
        pp=par.pp,
        dp=groups.dp.size(),
        vpp=par.vpp,
        groups=groups,
    )


def seed_model_parallel(device: torch.device, seed: int, tp_rank: int) -> None:
    """The random states a model's initialisation draws from (megatron's RNG tracker, with its
    per-TP-rank offsets): set again before a second model is built in the same process, the same
    seed gives it the same weights."""
    if device.type == "cuda":
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from engine.cpu_compat import cpu_model_parallel_seed

        cpu_model_parallel_seed(seed, tp_rank)


def _every_rank_comes(timeout_s: float, what: str) -> None:
    """Every rank of the running process group reaches this call within timeout_s of the first, else a
    ConfigError on each rank that came. torch.distributed collectives wait for ranks that may never come
    (gloo: the group's whole timeout, 30 minutes by default, stuck in megatron's first new_group), and a
    process group another program started (a trainer's) gives no other sign of which ranks will. Through
    the group's store, so any backend. Each join has a generation of its own (a counter in the store, not in
    the process: a rank that was refused alone must still meet the others at their next join): the last to
    arrive answers "ok", a rank whose wait ran out "gone", whichever is first (compare_set), each after
    moving the generation on so that no later call counts into this one; every rank acts on that one answer,
    so none goes into the collective while another gave up."""
    store = dist.distributed_c10d._get_default_store()
    world = dist.get_world_size()
    # torchrun's store outlives a restart of the job, and a join the last one left half done with it
    space = f"engine/runtime/join/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    generation = store.add(space + "generation", 0)
    key = f"{space}{generation}"

    def answer(word: str) -> None:
        store.compare_set(space + "generation", str(generation), str(generation + 1))
        store.compare_set(key + "/answer", "", word)

    if store.add(key, 1) == world:
        answer("ok")
    try:
        store.wait([key + "/answer"], datetime.timedelta(seconds=timeout_s))
    except dist.DistStoreError:
        answer("gone")
    if store.get(key + "/answer") != b"ok":
        raise ConfigError(f"{what} is collective over this process's group of {world} ranks, and only "
                          f"{store.add(key, 0)} came within {timeout_s:g} s: call it on every rank of the group "
                          "(each rank then holds its own replica), or give it processes of its own")


def current_or_new_runtime(par: ParallelConfig, seed: int, join_timeout_s: float | None = None,
                           what: str = "this run") -> Runtime:
    """init_runtime, or the runtime this process already runs (a test session, a trainer with a
    scorer beside it: megatron's parallel state is set up once per process) when its TP/PP layout
    is `par`'s; another layout raises ConfigError naming both. join_timeout_s: in a process group
    already running (another program's, as a trainer's), first wait that long for every rank to call
    it too (`what` names the call in the refusal), as a load after it needs them all: megatron's
    groups are made over the whole group, and engine.checkpoint_load.load gathers over it."""
    from megatron.core import parallel_state

    running = parallel_state.model_parallel_is_initialized()
    if running:
        from megatron.core.process_groups_config import ProcessGroupCollection

        groups = ProcessGroupCollection.use_mpu_process_groups()
        have = (groups.tp.size(), groups.pp.size())
        if have != (par.tp, par.pp):
            raise ConfigError(f"this process already runs tp={have[0]} pp={have[1]} (megatron's parallel state is "
                              f"set up once per process); {what} at tp={par.tp} pp={par.pp} needs a process of "
                              "its own")
    if join_timeout_s is not None and dist.is_initialized() and dist.get_world_size() > 1:
        _every_rank_comes(join_timeout_s, what)
    if not running:
        return init_runtime(par, seed)
    local_rank = _local_device(hosted=True)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                   tp=par.tp, pp=par.pp, dp=groups.dp.size(), vpp=par.vpp, groups=groups)


def peak_memory_gb(rt: Runtime) -> float | None:
    """The most GPU memory torch's allocator has reserved on any rank since the process started
    (what the card needed free), in GB; None on CPU. A collective: every rank calls it."""
    if not rt.is_cuda:
        return None
    peak = torch.tensor([torch.cuda.max_memory_reserved(rt.device) / 1e9], device=rt.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak.item())


def shutdown_runtime() -> None:
    from megatron.core import parallel_state

    if dist.is_initialized():
        dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def released_on_error():
    """The process groups an entry point's run starts, torn down when it leaves early (an error, its
    message printed inside the block), without shutdown_runtime's barrier (the other ranks may have
    stopped elsewhere): a gloo group left to the interpreter's exit sometimes aborts it ("terminate
    called without an active exception", exit -6) after the error was printed. Nothing to do once
    shutdown_runtime has run, and groups that were up before the block (a test session's, a
    trainer's beside a scorer) are not its to end."""
    was_running = dist.is_initialized()
    try:
        yield
    finally:
        if dist.is_initialized() and not was_running:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def end_with_launcher() -> bool:
    """A torchrun worker asks for SIGTERM when torchrun ends; -> whether it did. torchrun starts each
    worker in a session of its own, so a `kill -9` of torchrun (or of `polar pretrain` above it) left
    the ranks training and saving on, re-parented to PID 1, and a relaunch met them writing into its
    checkpoint directory. SIGTERM, not SIGKILL: the trainer's stop path saves the step it reached and
    exits 143 (the same command resumes). Linux sends it when the thread that started the process
    ends: torchrun's agent starts (and restarts) its workers from its main thread, which lasts as long
    as torchrun. A process of its own (no torchrun) is left alone: `nohup python engine/pretrain.py &`
    must outlive the shell that started it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    import signal

    from engine.worker_processes import parent_death_signal

    parent, ask = os.getppid(), parent_death_signal()
    if ask is None:  # not Linux
        return False
    ask(signal.SIGTERM)
    # torchrun ended before the signal was asked for: nothing will send it. A parent of 1 from the start
    # is no sign of that: torchrun is PID 1 as a container's first process (docker run, a Kubernetes pod)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
    return True
