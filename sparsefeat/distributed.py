"""Scale-out with torch.distributed: harvests and sweeps split across the processes `torchrun` starts.

    torchrun --nproc-per-node 2 -m sparsefeat harvest ... --out STORE.h5
    torchrun --nproc-per-node 2 -m sparsefeat sweep STORE.h5 ... --out sweep.h5

    torchrun --nproc-per-node 2 -m sparsefeat sweep STORE.h5 ... --out sweep.h5 --ddp
    torchrun --nproc-per-node 2 -m sparsefeat sweep STORE.h5 ... --out sweep.h5 --distribute-latents

Each process (rank) finds its rank and the world from torchrun's environment; the process group uses
NCCL where a rank has a GPU of its own and gloo on CPU. Harvests and the default sweep move no
gradients: the work is divided so that every rank computes exactly what a single process would for
its share. `--ddp` shares every step instead (below).

- Harvest: rank 0 plans the single-process run's document blocks (tokenizing only: the block
  boundaries and `--max-tokens` depend on token counts, not on activations) and gives each rank a
  contiguous run of blocks, balanced by tokens. Each rank writes its shard with the crash-safe
  `StoreWriter` to `STORE.h5.shards/rank-K-of-N.h5`; rank 0 then merges the shards, in rank order,
  into `STORE.h5` (a copy: the measured choice over an HDF5 virtual dataset, see README "Scale-out")
  and removes them. The merged rows, document ids, positions and split are the single process's.
- Sweep (members across ranks): each rank trains a share of the members, whole sizes where it can,
  balanced by cost (latents × members, greedy longest-processing-time first); every rank streams the
  same batches, so each member trains exactly as in one process. Rank 0 gathers the evaluations,
  weights and curves and writes the one results file (cross-member signals over all members).
- Sweep (`--ddp`, data-parallel): every rank holds the whole sweep and trains on rows r::world of each
  global batch; DistributedDataParallel averages the gradients, so every rank takes the same step,
  that of one process on the whole batch (up to float summation order). Rank 0 writes the
  checkpoint, evaluates and writes the results file.
- Sweep (`--distribute-latents`, relu-l1): every rank holds a contiguous slice of the latents of every
  dictionary (sliced from the single process's initial weights) and trains on every batch; the ranks
  sum their partial decodes and L1 terms each step. Rank 0 joins the slices for checkpoints and at the
  end, evaluates and writes the results file.

Resume is per rank: each shard and each rank's checkpoint resumes by itself, so a rerun with
`--resume` and the same number of processes continues wherever each rank stopped. (`--ddp` and
`--distribute-latents` write one checkpoint of the global state, which any number of ranks can resume.)
"""

from __future__ import annotations

import contextlib
import glob
import heapq
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError, SparsefeatError
from .files import WriterLock, check_output
from .products import stacked_linear
from .sae import ReluL1
from .train import Sweep

# Ranks wait for each other at a few points (the slowest shard, the slowest share of a sweep), which
# can take hours; torchrun ends every rank when one dies, so a waiting rank never waits for nothing.
WAIT = timedelta(days=30)


class DistributedError(SparsefeatError):
    """A distributed run that cannot start or go on (wrong shards on disk, a bad launch)."""


# --------------------------------------------------------------------------------------------
# Ranks and the process group
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process is one of several that torchrun started (WORLD_SIZE > 1), or was told to
    take the distributed path alone (SPARSEFEAT_DISTRIBUTED=1 under torchrun: a one-GPU NCCL check)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
        os.environ.get("SPARSEFEAT_DISTRIBUTED") == "1" and "RANK" in os.environ)


def world() -> World:
    """This process's rank, the number of processes, and its rank on this node (torchrun's env)."""
    try:
        return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                     int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)") from None


def local_device(device: str = "auto") -> torch.device:
    """The device of this rank: its own GPU (cuda:LOCAL_RANK) when it uses CUDA, else the CPU."""
    w = world()
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda, but this machine has no CUDA device")
        if w.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {w.local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                                   "here); start at most one process per GPU (--nproc-per-node)")
        return torch.device("cuda", w.local_rank)
    return torch.device(device)  # an explicit cuda:N is the user's choice


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[World]:
    """The process group for one command: NCCL when this rank runs on a GPU, gloo otherwise."""
    w = world()
    dev = local_device(device)
    if dist.is_initialized():  # a caller already set one up
        yield w
        return
    if dev.type == "cuda":
        # "auto" and "cuda" then mean this rank's GPU everywhere (the recorded options stay as given),
        # and object collectives under NCCL use it too.
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=WAIT)
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj, src: int = 0):
    """`obj` of rank `src`, on every rank (any picklable object)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    got = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, got, dst=0)
    return got


def all_ok(ok: bool) -> bool:
    """Whether every rank is ok (a failed check on one rank stops all, each with its own line)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag)
    return int(flag.item()) == 0


# --------------------------------------------------------------------------------------------
# Dividing work
# --------------------------------------------------------------------------------------------


def contiguous_parts(costs: Sequence[float], parts: int) -> list[tuple[int, int]]:
    """Split items 0..n into `parts` consecutive ranges [lo, hi) of about equal total cost: part k
    ends at the first item where the running total reaches (k+1)/parts of the whole."""
    total = float(sum(costs))
    bounds, running, k = [0], 0.0, 1
    for i, c in enumerate(costs):
        running += c
        while k < parts and running >= total * k / parts:
            bounds.append(i + 1)
            k += 1
    bounds += [len(costs)] * (parts + 1 - len(bounds))
    return [(bounds[k], bounds[k + 1]) for k in range(parts)]


def balanced_shares(groups: dict, costs: dict, parts: int) -> list[list]:
    """Greedy longest-processing-time: groups (key -> items) in order of falling cost, each to the part
    with the least cost so far (ties to the lower part). While there are fewer groups than parts, the
    costliest group of more than one item is halved first, so every part can get work."""
    units = [(costs[key] * len(items), list(items)) for key, items in groups.items()]
    while len(units) < parts:
        splittable = [u for u in units if len(u[1]) > 1]
        if not splittable:
            break
        cost, items = max(splittable, key=lambda u: u[0])
        units.remove((cost, items))
        half = len(items) // 2
        units += [(cost * half / len(items), items[:half]), (cost * (len(items) - half) / len(items), items[half:])]
    shares: list[list] = [[] for _ in range(parts)]
    loads = [(0.0, k) for k in range(parts)]
    for cost, items in sorted(units, key=lambda u: -u[0]):
        load, k = heapq.heappop(loads)
        shares[k] += items
        heapq.heappush(loads, (load + cost, k))
    return shares


# --------------------------------------------------------------------------------------------
# Harvest
# --------------------------------------------------------------------------------------------


def shard_folder(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".shards")


def shard_path(out: str | os.PathLike, rank: int, size: int) -> Path:
    """Where rank `rank` of `size` writes its shard (the world size is in the name: a plan is for one)."""
    return shard_folder(out) / f"rank-{rank}-of-{size}.h5"


@dataclass(frozen=True)
class PlannedBlock:
    first: int  # documents [first, stop)
    stop: int
    rows: int  # rows it will store
    tokens: int  # model input tokens (the cost of its forward passes)


def plan_blocks(config, corpus, tokenizer, n_docs: int) -> list[PlannedBlock]:
    """The document blocks a single-process harvest commits, found by tokenizing alone: the same
    grouping (`iter_blocks`) and the same `max_tokens` stop, counting the rows each block stores."""
    from .harvest import iter_blocks
    committed = 0

    def rows_wanted() -> int | None:
        return None if config.max_tokens is None else config.max_tokens - committed

    plan = []
    for block in iter_blocks(corpus, tokenizer, start=0, stop=n_docs, max_length=config.max_length,
                             block_tokens=config.block_tokens, rows_wanted=rows_wanted):
        if config.max_tokens is not None and committed >= config.max_tokens:
            break
        rows = sum(len(w.ids) if config.keep_special else int((~w.special).sum()) for w in block.windows)
        plan.append(PlannedBlock(block.first, block.stop, rows, sum(len(w.ids) for w in block.windows)))
        committed += rows
    return plan


def _plan(config) -> list[PlannedBlock]:
    from transformers import AutoTokenizer
    from .harvest import HarvestError, _first_line, _quiet_transformers, _resolve_model, load_corpus
    corpus = load_corpus(config.corpus, paragraphs=config.paragraphs, text_field=config.text_field)
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(_resolve_model(config.model)[1], local_files_only=True)
        except Exception as e:  # as load_model says it
            raise HarvestError(f"{config.model}: cannot load its tokenizer ({_first_line(e)})") from None
    n_docs = len(corpus) if config.max_documents is None else min(len(corpus), config.max_documents)
    return plan_blocks(config, corpus, tokenizer, n_docs)


def _check_shards(out: Path, w: World, resume: bool, force: bool) -> None:
    """Refuse shards of another world size (their plan is another) unless --force, which clears them."""
    folder = shard_folder(out)
    if not folder.exists():
        return
    mine = {shard_path(out, k, w.size).name for k in range(w.size)}
    foreign = sorted(p.name for p in folder.iterdir() if p.name.split(".h5")[0] + ".h5" not in mine)
    if foreign and not force:
        raise DistributedError(f"{folder}: holds shards of a harvest with another number of processes "
                               f"({foreign[0]}); resume with that number, or pass --force to start again")
    if not resume and not force and any(folder.iterdir()):
        raise DistributedError(f"{folder}: shards of an unfinished harvest are here; pass --resume to continue "
                               "them or --force to start again")


def harvest(config, out: str | os.PathLike, *, resume: bool = False, force: bool = False,
            progress: bool = True) -> Path | None:
    """The harvest of `config` into `out`, split across torchrun's ranks. Returns the store's path on
    rank 0 and None on the others. The store equals a single-process harvest's (rows, document ids,
    positions, split; activations to float tolerance)."""
    from . import harvest as single
    from .store import StoreError
    out = check_output(out, force=force, allow_existing=resume)
    if out.exists() and resume and not force:
        raise StoreError(f"{out}: is already complete; nothing to resume (use --force to rewrite)")
    with session(config.device) as w:
        error = None
        if w.is_main:
            try:
                _check_shards(out, w, resume, force)
                if force and shard_folder(out).exists():
                    shutil.rmtree(shard_folder(out))
                shard_folder(out).mkdir(exist_ok=True)
            except (SparsefeatError, OSError) as e:
                error = e
        if not all_ok(error is None):
            if error is not None:
                raise error
            raise DistributedError(f"{out}: rank 0 refused the harvest (its line says why)")
        plan, error = None, None
        if w.is_main:
            try:
                plan = _plan(config)
            except SparsefeatError as e:
                error = e
        plan = broadcast(plan if error is None else str(error))
        if isinstance(plan, str):  # rank 0's one line, on every rank
            raise (error or DistributedError(plan))
        first, stop = contiguous_parts([b.tokens for b in plan], w.size)[w.rank]
        mine = [(b.first, b.stop) for b in plan[first:stop]]
        shard = shard_path(out, w.rank, w.size)
        if mine and not shard.exists():
            single.harvest(config, shard, resume=resume, force=force, progress=progress and w.is_main,
                           blocks=mine)
        barrier()  # every shard complete
        if not w.is_main:
            return None
        shards = [shard_path(out, k, w.size) for k in range(w.size) if shard_path(out, k, w.size).exists()]
        if not shards:
            raise DistributedError(f"{out}: the corpus gave no documents to harvest")
        path = merge_shards(shards, out, resume=resume, force=force, progress=progress, world_size=w.size)
        shutil.rmtree(shard_folder(out))
        return path


def merge_shards(shards: Sequence[Path], out: Path, *, resume: bool = False, force: bool = False,
                 progress: bool = True, world_size: int | None = None) -> Path:
    """One store at `out` holding the shards' rows in order, written by the crash-safe writer (so it
    resumes, and computes the checksums of the whole); each shard's documents are committed with its
    last rows, so a resumed merge skips exactly the shards, and rows, it has committed."""
    from tqdm.auto import tqdm
    from .store import COPY_BLOCK_BYTES, StoreWriter
    from .store.h5 import open_for_reading
    import json
    with open_for_reading(Path(shards[0])) as f:
        a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        sites = {k: ds.shape[1] for k, ds in f["activations"].items()}
        first = next(iter(f["activations"].values()))
        settings = dict(sites=sites, provenance=json.loads(a["provenance"]), kind=a["kind"], dtype=str(first.dtype),
                        units=a["units"], split_unit=a["split_unit"], test_fraction=float(a["test_fraction"]),
                        split_seed=int(a["split_seed"]), compression=first.compression, tokens="tokens" in f)
    total = 0
    for shard in shards:
        with open_for_reading(Path(shard)) as f:
            total += int(f["rows/committed"][0])
    with StoreWriter(out, resume=resume, force=force, **settings) as writer, \
            tqdm(total=total, initial=writer.committed_rows, unit="row", desc=f"merge {out.name}",
                 disable=not progress, dynamic_ncols=True) as bar:
        row0 = 0  # first row of the current shard in the merged store
        for shard in shards:
            with open_for_reading(Path(shard)) as f:
                n = int(f["rows/committed"][0])
                step = max(1, COPY_BLOCK_BYTES // sum(d * writer.dtype.itemsize for d in sites.values()))
                for lo in range(max(0, writer.committed_rows - row0), n, step):
                    hi = min(n, lo + step)
                    tokens = {k: f["tokens"][k][lo:hi] for k in ("doc", "pos", "ids")} if "tokens" in f else None
                    docs = f["documents/test"][:int(f["documents/committed"][0])] if (
                        hi == n and "documents" in f) else None
                    writer.append({s: f["activations"][s][lo:hi] for s in sites}, test=f["rows/test"][lo:hi],
                                  tokens=tokens, documents_test=docs)
                    bar.update(hi - lo)
                row0 += n
        writer.close(attrs=dict(harvest_processes=world_size or len(shards)))
    return out


# --------------------------------------------------------------------------------------------
# Sweep: members across ranks
# --------------------------------------------------------------------------------------------


def member_shares(specs, parts: int) -> list[list[str]]:
    """Member ids per rank: whole sizes where there are enough of them, balanced by cost (latents ×
    members: a size-16x stack costs 32x a size-0.5x one of as many members)."""
    groups: dict[int, list[str]] = {}
    for s in specs:
        groups.setdefault(s.size, []).append(s.id)
    return balanced_shares(groups, {size: size for size in groups}, parts)


def checkpoint_of(out: str | os.PathLike, rank: int, size: int) -> Path:
    """Each rank's own checkpoint (the world size in the name: the shares are those of one)."""
    return Path(f"{out}.rank-{rank}-of-{size}.ckpt")


def _check_checkpoints(out: Path, w: World, force: bool) -> None:
    """Refuse checkpoints of another number of processes (their shares differ) unless --force,
    which deletes them."""
    mine = f"-of-{w.size}.ckpt"
    foreign = [p for p in out.parent.glob(f"{glob.escape(out.name)}.rank-*-of-*.ckpt") if not p.name.endswith(mine)]
    if foreign and not force:
        raise DistributedError(f"{foreign[0]}: a checkpoint of this sweep run with another number of processes; "
                               "resume with that number, or pass --force to start again")
    for p in foreign:
        p.unlink()


def sweep(store_path: str | os.PathLike, config, out: str | os.PathLike, *, resume: bool = False,
          force: bool = False, progress: bool = True) -> Path | None:
    """`train.train_sweep` with the members divided among torchrun's ranks. Returns the results path on
    rank 0 (the same file a single process writes), None on the others."""
    from .store import ActivationStore
    from .train import Sweep, TrainingError, check_sweep_output, remove_stale_temporaries
    out = check_sweep_output(out, store_path, resume=resume, force=force)
    with session(config.device) as w:
        lock = WriterLock(out, what="results file") if w.is_main else contextlib.nullcontext()
        with lock, ActivationStore(store_path) as store:
            if w.is_main:
                remove_stale_temporaries(out)
                _check_checkpoints(out, w, force)
            site = config.site or store.default_site()
            try:
                specs = config.members(store.width(site))
            except ValueError as e:
                raise TrainingError(f"{store.path}: {e}") from None
            mine = member_shares(specs, w.size)[w.rank]
            run = None
            if mine or w.is_main:
                run = Sweep(store, config, out, resume=resume, force=force, progress=progress and w.is_main,
                            members=mine, checkpoint=checkpoint_of(out, w.rank, w.size))
                if progress:
                    print(f"rank {w.rank}/{w.size}: {len(mine)} members, sizes "
                          f"{sorted({s.size for s in run.trained})}", file=sys.stderr)
            part = _train_share(run) if mine else {}
            parts = gather(part)
            path = None
            if w.is_main:
                evals, weights, training, last_fired = {}, {}, {}, {}
                for p in parts:
                    evals.update(p.get("evals", {}))
                    weights.update(p.get("weights", {}))
                    training.update(p.get("training", {}))
                    last_fired.update(p.get("last_fired", {}))
                    run.curves.update(p.get("curves", {}))
                # members in the sweep's order, as a single process lists them
                evals = {s.id: evals[s.id] for s in specs}
                weights = {s.id: weights[s.id] for s in specs}
                path = run.write_results(evals, weights, training, last_fired)
            barrier()  # the results are written: the checkpoints are no longer needed
            if run is not None:
                run.ckpt.unlink(missing_ok=True)
            return path


def _train_share(run) -> dict:
    run.train()
    evals = run.evaluate()
    # each member's training record (stops, dead latents, resamplings) and firing steps are its rank's
    return dict(evals=evals, weights=run.member_weights(), curves={s.id: run.curves[s.id] for s in run.trained},
                training=run.training_records(evals), last_fired=run.last_fired())


# --------------------------------------------------------------------------------------------
# Sweep: one sweep data-parallel (--ddp)
# --------------------------------------------------------------------------------------------


def under_torchrun() -> bool:
    """Whether torchrun started this process (any world size, one included)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_ddp(config, w: World) -> None:
    """Settings a data-parallel sweep refuses, each with its one line."""
    if config.batch_size % w.size:
        raise ConfigError(f"--ddp: the global --batch-size {config.batch_size} must divide evenly among the "
                          f"{w.size} processes (each trains on batch-size / processes rows per step)")
    if config.compile:
        raise ConfigError("--ddp: --compile is not supported with DistributedDataParallel here; leave it off")


class _TrainingLoss(torch.nn.Module):
    """A stack's training loss as a module's forward, which is what DistributedDataParallel wraps: its
    backward then averages the stack's gradients over the ranks."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, x):
        return self.stack.training_loss(x)


def state_digest(stacks) -> str:
    """A hash of every parameter and buffer of the stacks, bit for bit (to check ranks stay in sync)."""
    import hashlib
    h = hashlib.blake2b(digest_size=16)
    for st in stacks:
        for name, t in st.state_dict().items():
            if isinstance(t, torch.Tensor):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_in_sync(stacks, step: int) -> None:
    """Refuse to go on when a rank's weights differ from rank 0's (they must stay bit-identical: the same
    averaged gradients, the same unit-norm projection and Adam step on every rank)."""
    if not dist.is_initialized():
        return
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, state_digest(stacks))
    apart = [k for k, d in enumerate(digests) if d != digests[0]]
    if apart:
        raise DistributedError(f"--ddp: the weights of rank {apart[0]} differ from rank 0's at step {step} "
                               "(ranks out of sync); the last checkpoint is kept")


def _data_parallel(module, device_ids) -> DistributedDataParallel:
    """DDP without buffer syncing at each forward: the firing counters are reduced after each step
    (DataParallelSweep._reduce_firing), not overwritten with rank 0's. (At construction DDP copies
    rank 0's parameters and buffers to every rank: the same as each rank's own, seeded or resumed.)"""
    try:
        return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
    except TypeError:  # torch before 2.13 names it broadcast_buffers
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


class DataParallelSweep(Sweep):
    """A `Sweep` whose every step is shared by the ranks: rank r trains on rows r::world of each
    global batch, DistributedDataParallel averages the gradients (so a step equals one process's
    step on the whole batch, up to float summation order), and every rank then applies the same
    unit-norm projection and Adam step. Firing counters and logged losses are reduced over the
    ranks so that dead latents, resampling, curves and steps=auto stops agree everywhere. Rank 0
    alone writes checkpoints (which hold the global state: any number of ranks can resume them)."""

    def __init__(self, store, config, out, *, world: World, **kw):
        self.world = world
        super().__init__(store, config, out, **kw)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self._step_fns = [_data_parallel(_TrainingLoss(st), ids) for st in self.stacks]

    def startup_line(self) -> str:
        w = self.world
        return (f"{super().startup_line()}; data-parallel over {w.size} ranks, "
                f"{self.config.batch_size // w.size} rows of each batch of {self.config.batch_size} per rank")

    def _stream(self):
        w = self.world
        return (batch[w.rank::w.size] for batch in super()._stream())

    def step_on(self, batch):
        losses = super().step_on(batch)
        self._reduce_firing([i for i, loss in enumerate(losses) if loss is not None])
        return losses

    @torch.no_grad()
    def _reduce_firing(self, live: list[int]) -> None:
        """last_fired over all ranks' rows (the latest step a latent fired on any rank), and topk's
        rows_since_fired recomputed from it in global rows (single-process: B × steps since fired)."""
        if not live:
            return
        last = torch.cat([self.stacks[i].last_fired.flatten() for i in live])
        dist.all_reduce(last, op=dist.ReduceOp.MAX)
        for i, part in zip(live, last.split([self.stacks[i].last_fired.numel() for i in live])):
            st = self.stacks[i]
            st.last_fired.copy_(part.view_as(st.last_fired))
            if hasattr(st, "rows_since_fired"):
                st.rows_since_fired.copy_((st.train_steps - st.last_fired) * self.config.batch_size)

    def _log(self, pending, bar) -> None:
        """Each step's per-member losses averaged over the ranks (each rank's is the mean over its
        rows, so the average is the mean over the global batch) before they are checked and logged."""
        flat = [loss for step in pending for loss in step if loss is not None]
        if flat:
            total = torch.cat(flat)
            dist.all_reduce(total)
            total /= self.world.size
            parts = iter(total.split([loss.numel() for loss in flat]))
            pending = [[None if loss is None else next(parts) for loss in step] for step in pending]
        super()._log(pending, bar)

    def save_checkpoint(self) -> None:
        check_in_sync(self.stacks, self.step)
        if self.world.is_main:
            super().save_checkpoint()
        else:
            self.checkpoint_step = self.step


def ddp_sweep(store_path: str | os.PathLike, config, out: str | os.PathLike, *, resume: bool = False,
              force: bool = False, progress: bool = True) -> Path | None:
    """`train.train_sweep` with every step shared by torchrun's ranks (`--ddp`): `config.batch_size` stays
    the global batch, each rank training on its rows r::world of it, so the run equals a single process
    with the same batch up to float summation order. Checkpoints (`OUT.ckpt`, the single process's) are
    written by rank 0; rank 0 evaluates and writes the results file. Returns its path on rank 0, None
    elsewhere."""
    from .store import ActivationStore
    from .train import check_sweep_output, checkpoint_path, remove_stale_temporaries
    out = check_sweep_output(out, store_path, resume=resume, force=force)
    w = world()
    check_ddp(config, w)
    with session(config.device) as w:
        lock = WriterLock(out, what="results file") if w.is_main else contextlib.nullcontext()
        with lock, ActivationStore(store_path) as store:
            if w.is_main:
                remove_stale_temporaries(out)
                if force and not resume:  # here, not in every rank's Sweep: one rank deletes it
                    checkpoint_path(out).unlink(missing_ok=True)
            barrier()
            run = DataParallelSweep(store, config, out, world=w, resume=resume, force=force,
                                          progress=progress and w.is_main)
            if progress and w.is_main:
                print(run.startup_line(), file=sys.stderr)
            run.train()
            check_in_sync(run.stacks, run.step)
            path = None
            if w.is_main:  # the weights are the same on every rank: rank 0 evaluates them alone
                path = run.write_results(run.evaluate())
            barrier()  # the results are written: the checkpoint is no longer needed
            if w.is_main:
                run.ckpt.unlink(missing_ok=True)
            return path


# --------------------------------------------------------------------------------------------
# Sweep: every dictionary's latents split across the ranks (--distribute-latents)
# --------------------------------------------------------------------------------------------

# Per-latent tensors of a relu-l1 stack ([G, m, ...]): a rank holds latents [lo, hi) of each. The decoder
# bias, the sparsity settings and the step counter are replicated (every rank computes them identically).
LATENT_TENSORS = ("encoder", "encoder_bias", "decoder", "last_fired")


class _SumOverRanks(torch.autograd.Function):
    """Sum a tensor over the ranks; the backward passes the gradient through unchanged.

    Not `torch.distributed.nn.functional.all_reduce`, whose backward sums the gradients over the ranks
    too: here every rank computes the same loss from the summed tensor, so each rank's gradient is
    already the whole gradient, and summing it again would scale it by the number of ranks."""

    @staticmethod
    def forward(ctx, part):
        total = part.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad


def latent_slice(size: int, w: World) -> tuple[int, int]:
    """Latents [lo, hi) of a dictionary of `size` that rank w.rank holds (contiguous, as even as can be)."""
    return size * w.rank // w.size, size * (w.rank + 1) // w.size


class LatentSliceReluL1(ReluL1):
    """Rank r's slice of a relu-l1 stack: encoder rows, encoder bias and decoder rows of latents [lo, hi),
    the decoder bias whole. `size` stays the whole dictionary's m (the 'mean' L1 divides by it).
    x̂ = Σ_ranks W_d[lo:hi] c[lo:hi] + b; the L1 penalty is a sum over latents, so each rank's share of
    it has the gradient of the whole on its own latents, and its value is summed over the ranks. The
    unit-norm projection, Adam and the firing counters are per latent: local. The dense path only
    (the sparse one adds the bias inside its kernel)."""

    name = ""  # not an architecture of its own: results name it relu-l1
    kernel = "dense"

    def decode(self, codes):
        return _SumOverRanks.apply(stacked_linear(codes, self.decoder, transposed=True)) + self.decoder_bias[:, None, :]

    def penalty(self, codes):
        return _SumOverRanks.apply(super().penalty(codes))

    def codes_and_penalty(self, pre):  # the training step's fused ReLU + L1: its penalty too is a sum over ranks
        codes, penalty = super().codes_and_penalty(pre)
        return codes, _SumOverRanks.apply(penalty)


@torch.no_grad()
def slice_stack(full: ReluL1, w: World) -> LatentSliceReluL1:
    """Rank w.rank's slice of `full` (changed in place): sliced from the whole dictionary a single
    process initialises, so each slice starts exactly as those latents do there."""
    lo, hi = latent_slice(full.size, w)
    for name in LATENT_TENSORS:
        t = getattr(full, name)[:, lo:hi].clone()
        setattr(full, name, torch.nn.Parameter(t) if isinstance(getattr(full, name), torch.nn.Parameter) else t)
    full.__class__ = LatentSliceReluL1
    return full


def join_state(states: list[dict], latent: Sequence[str] = LATENT_TENSORS) -> dict:
    """One state dict from every rank's slice (in rank order): latent tensors joined along the latent
    axis, the rest (replicated) taken from rank 0."""
    return {k: torch.cat([s[k] for s in states], dim=1) if k in latent else v for k, v in states[0].items()}


def slice_state(state: dict, size: int, w: World, latent: Sequence[str] = LATENT_TENSORS) -> dict:
    lo, hi = latent_slice(size, w)
    return {k: v[:, lo:hi].clone() if k in latent else v for k, v in state.items()}


def check_distribute_latents(config, w: World, ddp: bool) -> None:
    """Settings --distribute-latents refuses, each with its one line."""
    if ddp:
        raise ConfigError("--distribute-latents: not with --ddp; every rank trains on the whole batch and holds "
                          "a slice of each dictionary (choose one)")
    if config.arch != "relu-l1":
        raise ConfigError(f"--distribute-latents: only relu-l1 is supported, not {config.arch} "
                          "(topk's global top-k across ranks is not implemented)")
    if config.compile:
        raise ConfigError("--distribute-latents: --compile is not supported; leave it off")
    if config.resample_steps:
        raise ConfigError("--distribute-latents: --resample-steps is not supported (resampling draws rows for "
                          "the dead latents of the whole dictionary); leave it off")


class LatentShardSweep(Sweep):
    """A `Sweep` in which every rank holds a slice of the latents of every dictionary (LatentSliceReluL1)
    and trains on every batch; the ranks sum their partial reconstructions at each step. Rank 0 joins
    the slices into whole dictionaries for each checkpoint (the single process's, resumable by any
    number of ranks) and at the end, and evaluates them alone."""

    def __init__(self, store, config, out, *, world: World, **kw):
        self.world = world
        self.latent_shards = world.size
        super().__init__(store, config, out, **kw)

    def startup_line(self) -> str:
        return f"{super().startup_line()}; latents of each dictionary split over {self.world.size} ranks"

    def _build_stacks(self):
        # the single process's whole stacks, initialised on the CPU, then this rank's slice on the device
        device, self.device = self.device, torch.device("cpu")
        try:
            stacks, specs = super()._build_stacks()
        finally:
            self.device = device
        small = [st.size for st in stacks if st.size < self.world.size]
        if small:
            raise ConfigError(f"--distribute-latents: a dictionary of {small[0]} latents cannot be split over "
                              f"{self.world.size} processes; use larger --sizes or fewer processes")
        return [slice_stack(st, self.world).to(self.device) for st in stacks], specs

    def _latent_params(self) -> list[bool]:
        """For each parameter, in the optimiser's order: whether it is per latent (sliced)."""
        return [name in LATENT_TENSORS for st in self.stacks for name, _ in st.named_parameters()]

    def _stack_states(self) -> list[dict]:
        parts = gather(super()._stack_states())
        return [join_state([p[i] for p in parts]) for i in range(len(self.stacks))] if self.world.is_main else None

    def _optimizer_state(self) -> dict:
        parts = gather(self.optimizer.state_dict())
        if not self.world.is_main:
            return None
        latent = self._latent_params()
        state = {i: join_state([p["state"][i] for p in parts], ("exp_avg", "exp_avg_sq") if latent[i] else ())
                 for i in parts[0]["state"]}
        return dict(parts[0], state=state)

    def save_checkpoint(self) -> None:
        if self.world.is_main:
            super().save_checkpoint()
        else:  # the collectives of rank 0's save, then nothing to write
            self._stack_states()
            self._optimizer_state()
            self.checkpoint_step = self.step

    def _restore(self, state: dict) -> None:
        """A whole checkpoint (any number of ranks, or one process, wrote it): this rank's slices."""
        latent = self._latent_params()
        opt = state["optimizer"]
        sizes = [st.size for st in self.stacks]
        stacks = [slice_state(sd, m, self.world) for sd, m in zip(state["stacks"], sizes)]
        param_size = [m for st, m in zip(self.stacks, sizes) for _ in st.parameters()]
        opt = dict(opt, state={i: slice_state(s, param_size[i], self.world, ("exp_avg", "exp_avg_sq") if latent[i]
                                              else ()) for i, s in opt["state"].items()})
        super()._restore(dict(state, stacks=stacks, optimizer=opt))

    def joined_stacks(self) -> list[ReluL1] | None:
        """On rank 0 the whole dictionaries (the slices joined), on the device; None elsewhere."""
        states = self._stack_states()
        if not self.world.is_main:
            return None
        whole = []
        for st, sd in zip(self.stacks, states):
            full = ReluL1(self.d, st.size, st.sparsities, st.seeds, st.options, self.bias)
            full.load_state_dict(sd)
            whole.append(full.to(self.device))
        return whole


def latent_sweep(store_path: str | os.PathLike, config, out: str | os.PathLike, *, resume: bool = False,
                 force: bool = False, progress: bool = True) -> Path | None:
    """`train.train_sweep` with each dictionary's latents split across torchrun's ranks
    (`--distribute-latents`): every rank trains on every batch, holding latents [m·r/N, m·(r+1)/N) of
    each dictionary. The run equals a single process up to float summation order (x̂ and the L1 summed
    over ranks). Rank 0 writes the checkpoints (whole dictionaries, as a single process's) and, having
    joined the slices, evaluates and writes the results file. Returns its path on rank 0, None elsewhere."""
    from .store import ActivationStore
    from .train import check_sweep_output, checkpoint_path, remove_stale_temporaries
    out = check_sweep_output(out, store_path, resume=resume, force=force)
    check_distribute_latents(config, world(), ddp=False)
    with session(config.device) as w:
        lock = WriterLock(out, what="results file") if w.is_main else contextlib.nullcontext()
        with lock, ActivationStore(store_path) as store:
            if w.is_main:
                remove_stale_temporaries(out)
                if force and not resume:  # here, not in every rank's Sweep: one rank deletes it
                    checkpoint_path(out).unlink(missing_ok=True)
            barrier()
            run = LatentShardSweep(store, config, out, world=w, resume=resume, force=force,
                                   progress=progress and w.is_main)
            if progress and w.is_main:
                print(run.startup_line(), file=sys.stderr)
            run.train()
            whole = run.joined_stacks()
            path = None
            if w.is_main:  # the whole dictionaries, as a single process holds them, evaluated on rank 0
                run.stacks = whole
                path = run.write_results(run.evaluate())
            barrier()  # the results are written: the checkpoint is no longer needed
            if w.is_main:
                run.ckpt.unlink(missing_ok=True)
            return path
