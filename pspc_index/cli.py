"""`pspc-index`: a thin command-line shell over the API. Bad input -> one line on stderr, exit 2."""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import click
import numpy as np
import torch

from .errors import UserError, check_device
from .index import KINDS, bundle_bytes
from .outputs import FILE, claim, save_npy, start_demo_dir, write_grid

DENOISERS = ("empirical", "gaussian", "cfdm", "els", "pspc-square", "pspc-flex", "network")
REPO_DATA = Path(__file__).resolve().parent.parent / "data"
# the reference network (the 1-hour high-t fine-tune of the first one, docs/network_high_t.md) and its heatmaps
DEFAULT_NETWORK = REPO_DATA / "network" / "fmnist-unet-ft"
DEFAULT_HEATMAPS = REPO_DATA / "heatmaps" / "fmnist-unet-ft.zarr"


def fail(msg: str) -> None:
    click.echo(f"pspc-index: error: {msg}", err=True)
    sys.exit(2)


def user_errors(f):
    """Turn UserError (and unreadable files) into one line and exit 2, never a traceback."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except UserError as e:
            fail(str(e).splitlines()[0] if str(e) else "bad input")
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            fail(f"{e.filename}: {e.strerror}")
    return wrapper


def resolve_tol(tol: float | None, default: float | None) -> float | None:
    """--tol as RetrievalPSPC takes it: None (not given) -> the command's default; inf -> None (no routing)."""
    tol = default if tol is None else tol
    return None if tol is not None and tol == float("inf") else tol


def write_routing(den, path, echo: bool = True) -> None:
    """A retrieval denoiser's routing per step (`retrieval.routing_summary`) as lines on stderr (with echo),
    and as JSON at `path` (if given) with every call's summary; nothing for other denoisers."""
    from .retrieval import routing_summary

    if not hasattr(den, "history"):
        return
    steps = routing_summary(den.history)
    for st in steps if echo else ():
        f = st["fractions"]
        bound = "certified" if st["certified"] else f"at confidence {st['confidence']:g} per location"
        if st["bound_max"] >= 2:  # pixels in [-1, 1]: such a bound says nothing (--tol inf routes nothing)
            bound += ", vacuous"
        click.echo(f"pspc-index: routing t={st['t_max']:.4g} s={st['s']}: retrieval {f['retrieval']:.1%}, tail "
                   f"{f['tail']:.1%}, exact {f['exact']:.1%}, skipped search {f['skipped']:.1%}; max pixel bound "
                   f"{st['bound_max']:.2g} ({bound}" + (f", {st['certificate']})" if st.get("certificate") else ")")
                   + (f"; {st['note']}" if st["note"] else ""), err=True)
    if path is not None:
        Path(path).write_text(json.dumps({"tol": den.tol, "tail": den.tail, "k": den.k, "m": den.m, "delta": den.delta,
                                          "steps": steps, "calls": den.history}, indent=1) + "\n")


def check_denoiser_options(denoiser, patch_size=None, els: dict | None = None, network=None, heatmaps=None):
    """Refuse options the chosen denoiser would silently ignore."""
    uses_patch = denoiser in ("pspc-square", "els")
    if patch_size is not None and not uses_patch:
        raise UserError(f"--patch-size applies to --denoiser pspc-square or els, not {denoiser}")
    if els and els.get("max_images") is not None and denoiser != "els":
        raise UserError(f"--els-images applies to --denoiser els, not {denoiser}")
    if els and els.get("boundary") not in (None, "broken") and denoiser != "els":
        raise UserError(f"--els-boundary applies to --denoiser els, not {denoiser}")
    if network is not None and denoiser != "network":
        raise UserError(f"--network applies to --denoiser network, not {denoiser}")
    if heatmaps is not None and denoiser != "pspc-flex":
        raise UserError(f"--heatmaps applies to --denoiser pspc-flex, not {denoiser}")


def check_seed(seed: int) -> None:
    """Seeds seed numpy's SeedSequence (sampling noise, exclusion draws), which takes no negative values."""
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")


def load_z(path: str, shape) -> torch.Tensor:
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable .npy array ({type(e).__name__})") from None
    if z.dtype.kind != "f":
        raise UserError(f"{path}: z must be a float array, got {z.dtype}")
    if z.ndim != 4 or tuple(z.shape[1:]) != tuple(shape):
        raise UserError(f"{path}: z has shape {list(z.shape)}, the store's images are [B, {', '.join(map(str, shape))}]")
    if not np.isfinite(z).all():
        raise UserError(f"{path}: z contains NaN or Inf")
    return torch.from_numpy(z.astype(np.float32))


# options shared by the commands that take them: one definition per concept
store_opt = click.option("--store", "store_path", required=True, type=click.Path(), help="Image store (.zarr).")
xflip_opt = click.option("--xflip/--no-xflip", default=True, show_default=True,
                         help="Add horizontally flipped training images (a view, as the paper's code).")
denoiser_opt = click.option("--denoiser", type=click.Choice(DENOISERS), default="pspc-square", show_default=True)
patch_opt = click.option("--patch-size", type=int, default=None, help="Fixed square patch size (else the schedule).")
schedule_opt = click.option("--schedule", default=None, help="Schedule name (default: by resolution).")
network_opt = click.option("--network", "network_path", type=click.Path(), default=None,
                           help="Network weights stem (default: the shipped Fashion-MNIST U-Net).")
heatmaps_opt = click.option("--heatmaps", "heatmaps_path", type=click.Path(), default=None,
                            help="Heatmaps .zarr for pspc-flex (default: the shipped ones).")
overwrite_opt = click.option("--overwrite", is_flag=True,
                              help="Replace this command's existing outputs: an output file (.npy, .png, .npz) "
                                   "that exists, or a pspc-index artefact of the kind written (store, bundle, "
                                   "sample run); never a plain file or folder where a store, bundle or run goes.")
device_opt = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)


def retrieval_opts(f):
    """--index BUNDLE --k --tail --m --nprobe --tol --certificate --no-skip --report, passed to the command as
    one `retrieval` dict (tol None: the command's default; inf: no routing, given as None). Without --index
    any of them given is refused: the exact engine would ignore it."""
    @functools.wraps(f)
    def wrapper(*args, index_path, k, tail, m, nprobe, tol, report, certificate, no_skip, **kwargs):
        if report is not None and index_path is None:
            fail("--report writes the routing report of --index; give --index BUNDLE")
        values = {"k": k, "tail": tail, "m": m, "nprobe": nprobe, "tol": tol, "certificate": certificate,
                  "no_skip": no_skip}
        given = [p.opts[0] for p in click.get_current_context().command.params
                 if p.name in values and values[p.name] != p.default]
        if given and index_path is None:
            fail(f"{', '.join(given)} configure retrieval; give --index BUNDLE")
        if tol is not None and math.isinf(tol) and (certificate is not None or no_skip):
            fail("--certificate and --no-skip apply with a finite --tol (--tol inf routes nothing)")
        return f(*args, retrieval={"index_path": index_path, "k": k, "tail": tail, "m": m, "nprobe": nprobe,
                                   "tol": tol, "report": report, "certificate": certificate or "projection",
                                   **({"certificate_given": certificate} if certificate else {}),
                                   **({"no_skip": True} if no_skip else {})}, **kwargs)
    for opt in reversed([
        click.option("--index", "index_path", type=click.Path(), default=None,
                     help="Index bundle (from `build`): retrieval PSPC-Square instead of the exact engine."),
        click.option("--k", "k", type=int, default=1024, show_default=True, help="Candidates per query and block."),
        click.option("--tail", type=click.Choice(["sample", "none"]), default="none", show_default=True,
                     help="Uniform tail sample beyond the top k, for loose tolerances only: where a location "
                          "rests on it, its bound is an empirical-Bernstein confidence bound (fails with "
                          "probability <= 1e-3 per location), and locations it cannot bring under --tol are "
                          "routed to exact (the report says how many)."),
        click.option("--m", "--tail-size", "m", type=int, default=4096, show_default=True,
                     help="Tail sample size (under torchrun write --tail-size: torchrun reads --m as its own)."),
        click.option("--nprobe", type=int, default=None, help="IVF cells searched (default: the bundle's, nlist/8)."),
        click.option("--tol", type=float, default=None,
                     help="Certified composite error per pixel (pixels in [-1, 1]): crop locations whose "
                          "retrieval bound exceeds it are recomputed by the exact kernel, and steps predicted "
                          "too diffuse skip the search. inf: report the bounds, route nothing. "
                          "[default: 1e-3 for denoise and sample; inf for attribute (sparse top-k shares)]"),
        click.option("--certificate", type=click.Choice(["projection", "index"]), default=None,
                     help="With a tol, how crops of s <= 3 are certified: projection cells (built in memory on "
                          "first use; CPU; attribution keeps the index's) or the index's cells. "
                          "[default: projection]"),
        click.option("--no-skip", is_flag=True, default=False,
                     help="Search (certify) at every step, also where the skip predictor would run it exact "
                          "(it is conservative on large stores of near-duplicates: README, scale run)."),
        click.option("--report", type=click.Path(), default=None,
                     help="With --index: write the routing report here (JSON: per step the fractions of crop "
                          "locations by retrieval, tail, exact and skipped search, the largest pixel bound)."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


def exclusion_opts(f):
    """--exclude FILE, --exclude-label L (repeatable, or a comma list), --label L, passed to the command as
    one `exclusion` dict (the arguments of `counterfactual.exclusion`)."""
    @functools.wraps(f)
    def wrapper(*args, exclude, exclude_labels, label, **kwargs):
        labels = [v.strip() for given in exclude_labels for v in given.split(",") if v.strip()]
        return f(*args, exclusion={"exclude": exclude, "exclude_labels": labels, "label": label}, **kwargs)
    for opt in reversed([
        click.option("--exclude", type=click.Path(), default=None,
                     help="Leave out these stored images (and their flips): store indices, one a line, or an "
                          ".npy of them. The same result as a store without them."),
        click.option("--exclude-label", "exclude_labels", multiple=True,
                     help="Leave out every image of this label (integer or class name; repeat or comma-separate)."),
        click.option("--label", default=None,
                     help="Class-conditional: only images of this label (integer or class name)."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


def els_opts(f):
    """--els-images M, --els-boundary broken|circular, passed to the command as one `els` dict."""
    @functools.wraps(f)
    def wrapper(*args, els_images, els_boundary, **kwargs):
        return f(*args, els={"max_images": els_images, "boundary": els_boundary}, **kwargs)
    for opt in reversed([
        click.option("--els-images", type=int, default=None,
                     help="ELS: pool the patches of only a seeded random subset of this many stored images "
                          "(flips follow); the full set costs ~N x locations patches per pixel (README)."),
        click.option("--els-boundary", type=click.Choice(["broken", "circular"]), default="broken",
                     show_default=True,
                     help="ELS boundary: Kamb & Ganguli's boundary-broken ELS (zero-padded networks) or circular."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


def denoiser_options(f):
    """Every option that chooses and configures a denoiser (denoise and sample share them)."""
    for opt in reversed([denoiser_opt, patch_opt, schedule_opt, xflip_opt, network_opt, heatmaps_opt, device_opt,
                         retrieval_opts, exclusion_opts, els_opts]):
        f = opt(f)
    return f


def denoiser_factory(store, denoiser, patch_size=None, schedule=None, network_path=None, heatmaps_path=None,
                     device="cpu", retrieval: dict | None = None, default_tol: float | None = None,
                     els: dict | None = None):
    """make(data) -> the named denoiser over `data` (any view of the opened ImageStore `store`'s training
    set, e.g. one without some images); the index bundle, heatmaps or network are loaded once, here.
    els: ELS options {"max_images", "boundary"}; --patch-size is ELS's fixed window k. retrieval["tol"]
    None: default_tol (`resolve_tol`)."""
    from . import denoisers as dn
    from .schedule import get_schedule

    check_device(device)
    check_denoiser_options(denoiser, patch_size, els, network_path, heatmaps_path)
    sched = get_schedule(schedule, *store.shape[2:])
    if retrieval and retrieval.get("index_path"):
        from .index import faiss_has_gpu, open_bundle
        from .retrieval import RetrievalPSPC
        if denoiser != "pspc-square":
            raise UserError(f"--index works with --denoiser pspc-square, not {denoiser}")
        # with faiss-gpu the indices search on the GPU too; with faiss-cpu only the torch maths moves
        bundle = open_bundle(retrieval["index_path"], store, gpu=device == "cuda" and faiss_has_gpu())
        return lambda data: RetrievalPSPC(data, bundle, k=retrieval["k"], tail=retrieval.get("tail") or "none",
                                          m=retrieval["m"], nprobe=retrieval.get("nprobe"), patch_size=patch_size,
                                          schedule=sched, tol=resolve_tol(retrieval.get("tol"), default_tol),
                                          projection=retrieval.get("certificate", "projection") == "projection",
                                          predict=not retrieval.get("no_skip", False))
    if denoiser == "pspc-flex":
        from .sensitivity import read_heatmaps
        maps, ts, _ = read_heatmaps(heatmaps_path or DEFAULT_HEATMAPS)
        return lambda data: dn.PSPCFlex(data, maps, ts, schedule=sched)
    if denoiser == "network":
        from .network import check_image_shape, load_network
        net = load_network(network_path or DEFAULT_NETWORK, device=device)
        check_image_shape(net, store.shape[1:], network_path or DEFAULT_NETWORK)
        return lambda data: dn.Network(net, store.shape[1:], data)
    if denoiser == "els":
        return lambda data: dn.ELS(data, k=patch_size, schedule=sched, **(els or {}))
    return {"empirical": dn.Empirical, "gaussian": dn.Gaussian, "cfdm": dn.CFDM,
            "pspc-square": lambda data: dn.PSPCSquare(data, patch_size=patch_size, schedule=sched)}[denoiser]


def build_denoiser(store, denoiser, xflip=True, patch_size=None, schedule=None, network_path=None,
                   heatmaps_path=None, device="cpu", retrieval: dict | None = None, default_tol: float | None = None,
                   exclusion=None, els: dict | None = None):
    """Make the named denoiser over `store` (an opened ImageStore or a store path; the API the CLI shells
    over), without the images of `exclusion` (a counterfactual.Exclusion) if given."""
    from .store import ImageStore

    check_device(device)  # before the training set moves to the device
    check_denoiser_options(denoiser, patch_size, els, network_path, heatmaps_path)
    if not isinstance(store, ImageStore):
        store = ImageStore.open(store)
    excluding = exclusion is not None and len(exclusion.ids) > 0
    if excluding and denoiser == "network":
        raise UserError("--exclude/--exclude-label/--label do not apply to --denoiser network "
                        "(its training set is in its weights)")
    data = store.training_set(xflip=xflip, device=device)
    make = denoiser_factory(store, denoiser, patch_size, schedule, network_path, heatmaps_path, device, retrieval,
                            default_tol, els)
    return make(exclusion.apply(data) if excluding else data)


@click.group()
@click.version_option(package_name="pspc-index")
def cli():
    """Training-free patch posterior composite (PSPC) denoisers: exact and retrieval-based."""


@cli.command()
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default=None, help="Layout of a .npy/.npz source.")
@overwrite_opt
@user_errors
def ingest(src, out, layout, overwrite):
    """Write SRC (image folder, EDM zip, .npy/.npz, CIFAR-10 tar, IDX .gz, or `fashion-mnist`) as a store."""
    from .ingest import ingest as run

    store = run(src, out, layout=layout, overwrite=overwrite,
                note=lambda line: click.echo(f"pspc-index: note: {line}", err=True))
    click.echo(f"wrote {out}: {store.shape[0]} images of {store.shape[1]}x{store.shape[2]}x{store.shape[3]}"
               f" (sha256 {store.sha256[:12]})")


@cli.command()
@click.argument("store_path", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
@user_errors
def info(store_path, as_json):
    """What a store holds."""
    from .schedule import default_schedule
    from .store import ImageStore

    store = ImageStore.open(store_path)
    n, c, h, w = store.shape
    rep = {"path": str(store_path), "images": n, "channels": c, "height": h, "width": w,
           "with_flips": 2 * n, "labels": store.labels is not None, "source": store.meta.get("source", ""),
           "sha256": store.sha256, "recorded_sha256": store.recorded_sha256,
           "edited_in_place": store.edited_in_place, "bytes": int(store.images.nbytes),
           "default_schedule": default_schedule(h, w).name}
    if store.labels is not None:
        rep["classes"] = int(len(np.unique(store.labels)))
    if store.meta.get("classes"):
        rep["class_names"] = store.meta["classes"]
    click.echo(json.dumps(rep, indent=1) if as_json else "\n".join(f"{k}: {v}" for k, v in rep.items()))
    if store.edited_in_place:
        click.echo(f"pspc-index: warning: {store_path}: the images were rewritten since ingest (sha256 "
                   f"{store.sha256[:12]} as read, {str(store.recorded_sha256)[:12]} recorded); bundles and sample "
                   "runs made before the change are refused", err=True)


@cli.command()
@store_opt
@click.option("--z", "z_path", type=click.Path(), default=None, help="Noisy inputs, float32 [B, C, H, W] .npy.")
@click.option("--t", "t", type=float, required=True, help="Noise level (EDM sigma).")
@click.option("--n", "n", type=int, default=16, show_default=True,
              help="Without --z: draw this many forward-process z = x + t eps from the store.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out", type=click.Path(), required=True, help="Output .npy.")
@overwrite_opt
@denoiser_options
@user_errors
def denoise(store_path, z_path, t, n, seed, out, overwrite, denoiser, patch_size, schedule, xflip, network_path,
            heatmaps_path, device, retrieval, exclusion, els):
    """Denoise z at noise level t and write D(z, t) as .npy."""
    check_seed(seed)
    from .counterfactual import exclusion as select, included_ids
    from .retrieval import DEFAULT_TOL
    from .store import ImageStore

    if not str(out).endswith(".npy"):
        raise UserError(f"--out {out}: denoise writes a .npy array; give a path ending in .npy")
    if not np.isfinite(t) or t <= 0:
        raise UserError(f"--t must be finite and > 0, got {t}")
    if z_path is None and n <= 0:
        raise UserError(f"--n must be > 0, got {n}")
    check_device(device)
    check_denoiser_options(denoiser, patch_size, els, network_path, heatmaps_path)
    claim(out, FILE, overwrite)
    if retrieval["report"] is not None:
        claim(retrieval["report"], FILE, overwrite)
    store = ImageStore.open(store_path)
    excluded = select(store, **exclusion)
    den = build_denoiser(store, denoiser, xflip, patch_size, schedule, network_path, heatmaps_path, device,
                         retrieval, DEFAULT_TOL, exclusion=excluded, els=els)
    if z_path is not None:
        z = load_z(z_path, den.shape)
    else:
        # forward-process queries from the images taking part, as a store without the excluded ones draws them
        data = excluded.apply(store.training_set(xflip))
        g = torch.Generator().manual_seed(seed)
        idx = included_ids(data)[torch.randint(0, data.n_included, (n,), generator=g)]
        z = data.get(idx) + t * torch.randn(n, *data.shape, generator=g)
    x = den(z, t).cpu().numpy().astype(np.float32)
    save_npy(out, x)
    write_routing(den, retrieval["report"])
    click.echo(f"wrote {out}: {list(x.shape)} ({denoiser}, t={t:g})")


@cli.command()
@click.argument("store_path", type=click.Path())
@click.argument("bundle_path", type=click.Path())
@click.option("--patch-sizes", default=None,
              help="Comma-separated sizes, e.g. 3,5,7 (default: the schedule's sizes below full size).")
@click.option("--index", "kind", type=click.Choice(KINDS), default="ivf-pq", show_default=True,
              help="FAISS index per block: exact flat, 8-bit sq8, or inverted lists (ivf-*) over k-means cells.")
@click.option("--stride", type=int, default=4, show_default=True, help="Anchor block side (positions per index).")
@click.option("--nlist", type=int, default=None, help="IVF cells (default about sqrt(N)).")
@click.option("--pq-m", type=int, default=32, show_default=True,
              help="ivf-pq: 4-bit sub-quantizers per code (at most; M/2 bytes a patch).")
@click.option("--gpu", is_flag=True, help="Train and add on the GPU (needs faiss-gpu and CUDA).")
@click.option("--threads", type=int, default=None,
              help="CPU threads for FAISS's k-means and adding and for torch (default: OMP_NUM_THREADS if set, "
                   "else every core).")
@xflip_opt
@overwrite_opt
@click.option("--json", "as_json", is_flag=True)
@user_errors
def build(store_path, bundle_path, patch_sizes, kind, stride, nlist, pq_m, gpu, threads, xflip, overwrite, as_json):
    """Build (or resume) an index bundle for STORE at BUNDLE; under torchrun the index files are split
    over the processes."""
    from .distributed import init_distributed
    from .index import build_bundle

    sizes = None  # the store's default schedule's, chosen where the store is opened
    if patch_sizes is not None:
        try:
            sizes = [int(v) for v in patch_sizes.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--patch-sizes {patch_sizes!r}: expected comma-separated integers") from None
    rank, world = init_distributed("cuda" if gpu else "cpu")
    man = build_bundle(store_path, bundle_path, sizes, stride=stride, kind=kind, xflip=xflip, nlist=nlist,
                       pq_m=pq_m, gpu=gpu, progress=not as_json, rank=rank, world=world, overwrite=overwrite,
                       threads=threads)
    if world > 1:  # left to interpreter exit, gloo's threads can abort a process that has finished
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    nbytes = bundle_bytes(bundle_path)  # on disk, entries included (the manifest lists the index files only)
    rep = {"bundle": str(bundle_path), "patch_sizes": man["patch_sizes"], "kind": kind, "stride": stride,
           "nlist": man["nlist"], "xflip": xflip, "files": len(man["files"]), "bytes": nbytes,
           "store_sha256": man["store_sha256"]}
    click.echo(json.dumps(rep) if as_json else
               f"wrote {bundle_path}: {len(man['files'])} {kind} indices for s={man['patch_sizes']} ({nbytes} bytes)")


@cli.command()
@store_opt
@click.option("--n", "-n", "n", type=int, default=16, show_default=True,
              help="Number of samples (under torchrun write -n: torchrun reads --n as its own option).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out", type=click.Path(), required=True, help="Samples: .npy or .zarr (resumable).")
@click.option("--steps", type=int, default=18, show_default=True)
@click.option("--sampler", "solver", type=click.Choice(["euler", "heun"]), default="euler", show_default=True)
@click.option("--batch", default="64", show_default=True,
              help="Samples per batch, or 'auto': the largest whose estimated memory fits --memory-gb.")
@click.option("--memory-gb", type=float, default=None,
              help="Budget for --batch auto (default: half the available RAM, or of the free GPU memory).")
@click.option("--split", type=click.Choice(["samples", "locations"]), default="samples", show_default=True,
              help="Under torchrun: split the samples, or the crop locations (each process holds only its "
                   "locations' indices; composites summed with all-reduce).")
@click.option("--record", is_flag=True, help="Also keep the trajectory (z and D at every step).")
@overwrite_opt
@denoiser_options
@user_errors
def sample(store_path, n, seed, out, steps, solver, batch, memory_gb, split, record, overwrite, denoiser, patch_size,
           schedule, xflip, network_path, heatmaps_path, device, retrieval, exclusion, els):
    """Draw N samples with the PF-ODE; write them (float32 [N, C, H, W]) and a PNG grid beside them."""
    check_seed(seed)
    from .counterfactual import exclusion as select
    from .distributed import SAMPLES, init_distributed, launched_distributed, resolve_batch, run_meta, sample_to_zarr
    from .retrieval import DEFAULT_TOL
    from .sampler import sample as run, save_samples
    from .store import ImageStore

    if not str(out).endswith((".npy", ".zarr")):
        raise UserError(f"--out {out}: use a .npy or .zarr path")
    if batch != "auto" and not batch.isdigit():
        raise UserError(f"--batch must be a positive integer or 'auto', got {batch!r}")
    if n <= 0 or batch == "0" or steps < 2:
        raise UserError(f"need n > 0, batch > 0 and steps >= 2, got n={n}, batch={batch}, steps={steps}")
    zarr_out = str(out).endswith(".zarr")
    if launched_distributed() and not zarr_out:
        raise UserError(f"--out {out}: under torchrun, write a resumable .zarr (e.g. --out samples.zarr)")
    if split == "locations" and denoiser != "pspc-square":
        raise UserError(f"--split locations splits PSPC-Square's crop locations; not for {denoiser}")
    check_device(device)  # before init_distributed or the batch estimate touch CUDA
    check_denoiser_options(denoiser, patch_size, els, network_path, heatmaps_path)
    # every output is claimed before any work: a resumed run owns its grid, anything else needs --overwrite
    png = Path(str(out).rsplit(".", 1)[0] + ".png")
    resuming = zarr_out and claim(out, SAMPLES, resume=True).exists()
    claim(png, FILE, overwrite or resuming)
    if record and not zarr_out:
        claim(str(out)[:-4] + ".trajectory.npz", FILE, overwrite)
    if not zarr_out:
        claim(out, FILE, overwrite)
    if retrieval["report"] is not None:
        claim(retrieval["report"], FILE, overwrite)
    rank, world = init_distributed(device) if zarr_out else (0, 1)
    store = ImageStore.open(store_path)  # opened once: loading hashes the pixels, which the run records
    excluded = select(store, **exclusion)
    den = build_denoiser(store, denoiser, xflip, patch_size, schedule, network_path, heatmaps_path, device,
                         retrieval, DEFAULT_TOL, exclusion=excluded, els=els)
    if split == "locations":
        den.locations = (rank, world)
    batch = resolve_batch(batch, memory_gb, den, n, steps, record, device, out if zarr_out else None)
    used = min(batch, n)  # a batch larger than the run is one batch of n
    if not zarr_out:
        res = run(den, n, seed, steps=steps, solver=solver, batch=batch, record=record, progress=True)
        x = res[0] if record else res
        save_samples(out, x, res[1] if record else None,
                     provenance={"store_sha256": store.sha256, "exclusion": excluded.record()})
        write_grid(png, x)
        write_routing(den, retrieval["report"])
        click.echo(f"wrote {out} ({n} samples, batch {used}) and {png}")
        return
    # settings recorded resolved (absolute paths, defaults written out) so the same run resumes however written
    from .schedule import get_schedule
    resolved = {k: v for k, v in retrieval.items() if k not in ("report", "certificate_given")}
    if retrieval.get("index_path") is not None:
        resolved.update(nprobe=retrieval.get("nprobe") or den.bundle.manifest.get("nprobe"), tol=den.tol)
    meta = run_meta(store.sha256, denoiser, xflip, patch_size, get_schedule(schedule, *store.shape[2:]).name,
                    resolved, network=network_path or DEFAULT_NETWORK if denoiser == "network" else None,
                    heatmaps=heatmaps_path or DEFAULT_HEATMAPS if denoiser == "pspc-flex" else None,
                    els=els if denoiser == "els" else None, exclusion=excluded.record())
    x = sample_to_zarr(den, out, n, seed, steps=steps, solver=solver, batch=batch, record=record,
                       progress=True, rank=rank, world=world, meta=meta, split=split)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    if x is not None:
        write_grid(png, torch.from_numpy(x[:256]))
    write_routing(den, retrieval["report"])
    how = f", {world} processes split by {split}" if world > 1 else ""
    click.echo(f"wrote {out} ({n} samples, batch {used}{how}) and {png}")


@cli.command()
@click.option("--out-dir", type=click.Path(), default="pspc-demo", show_default=True)
@click.option("--n", "n", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-data", type=int, default=5000, show_default=True,
              help="Use the first N stored images (0: all 60,000); all of them: ~100 s on 2 cores instead of ~10 s.")
@user_errors
def demo(out_dir, n, seed, n_data):
    """Ingest the bundled Fashion-MNIST, draw N PSPC-Square samples, write a PNG grid."""
    check_seed(seed)
    from .denoisers import PSPCSquare
    from .ingest import ingest as run_ingest
    from .sampler import sample as run

    out = start_demo_dir(out_dir)
    store_path = out / "fashion-mnist.zarr"
    if not store_path.exists():
        click.echo("ingesting the bundled Fashion-MNIST training set ...")
        run_ingest("fashion-mnist", str(store_path))
    from .store import ImageStore
    data = ImageStore.open(store_path).training_set()
    if n_data > 0:
        data = data.subset(range(min(n_data, data.n_stored)))
    den = PSPCSquare(data)
    click.echo(f"drawing {n} PSPC-Square samples (18 Euler steps, exact engine, {len(data):,} images with flips) ...")
    x = run(den, n, seed, progress=True)
    save_npy(out / "samples.npy", x.numpy())
    write_grid(out / "samples.png", x)
    click.echo(f"samples: {out / 'samples.png'}")


@cli.command()
@store_opt
@click.option("--image", "image_path", type=click.Path(), default=None,
              help="Query images .npy (uint8 or float in [-1, 1], [B, C, H, W]); z = x + t eps (seeded).")
@click.option("--z", "z_path", type=click.Path(), default=None, help="Noisy queries, float [B, C, H, W] .npy.")
@click.option("--trajectory", "traj_path", type=click.Path(), default=None,
              help="A `sample --record` <stem>.trajectory.npz: steps aggregated with Euler weights.")
@click.option("--t", "t", type=float, default=None, help="Noise level (with --image or --z).")
@click.option("--top", "top", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--panel", "panel", type=click.Path(), default=None, help="Also write a PNG panel of the top images.")
@click.option("--verify", "verify", type=int, default=None,
              help="Remove each query's top M stored images (flips too), recompute it from the same noise (a "
                   "trajectory: regenerate its sample from z_T) and report the change next to removing M random "
                   "images.")
@click.option("--verify-draws", type=int, default=5, show_default=True,
              help="Random removals for --verify (seeded by --seed).")
@patch_opt
@schedule_opt
@xflip_opt
@overwrite_opt
@retrieval_opts
@exclusion_opts
@user_errors
def attribute(store_path, image_path, z_path, traj_path, t, top, seed, as_json, panel, verify, verify_draws, overwrite,
              patch_size, schedule, xflip, retrieval, exclusion):
    """PSPC-Square attribution: each training image's share of D(z, t) (or of a recorded sample), exact or,
    with --index, over the retrieved candidates."""
    check_seed(seed)
    from . import attribution as at
    from .counterfactual import exclusion as select
    from .store import ImageStore

    given = [o for o, v in (("--image", image_path), ("--z", z_path), ("--trajectory", traj_path)) if v is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one of --image, --z, --trajectory (got {', '.join(given) or 'none'})")
    if traj_path is None and (t is None or not np.isfinite(t) or t <= 0):
        raise UserError(f"{given[0]} needs --t, finite and > 0 (got {t})")
    if traj_path is not None and t is not None:
        raise UserError("--t does not apply to --trajectory (its noise levels are recorded)")
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    if verify is not None and (verify < 1 or verify_draws < 1):
        raise UserError(f"--verify and --verify-draws must be >= 1, got {verify} and {verify_draws}")
    if panel is not None:
        claim(panel, FILE, overwrite)
    if retrieval["report"] is not None:
        claim(retrieval["report"], FILE, overwrite)
    if retrieval.get("certificate_given") == "projection":
        raise UserError("attribute certifies with the index's cells (projection cells give no per-image "
                        "weights); leave out --certificate projection")
    store = ImageStore.open(store_path)
    excluded = select(store, **exclusion)
    if traj_path is not None:  # a trajectory attributed over another set would verify against nothing
        at.check_trajectory_provenance(traj_path, store.sha256, excluded.record())
    data = excluded.apply(store.training_set(xflip))
    taking_part = data.n_included // (2 if xflip else 1)
    if verify is not None and verify >= taking_part:  # checked before the attribution's passes, not after
        raise UserError(f"--verify {verify}: need M < {taking_part}, the stored images taking part")
    make = denoiser_factory(store, "pspc-square", patch_size, schedule, retrieval=retrieval)
    den = make(data)
    labels, classes = store.labels, store.meta.get("classes")
    want_maps = panel is not None
    columns, checks = [], None
    if traj_path is not None:
        ts, zs, ds = at.load_trajectory(traj_path, den.shape)
        res, shares, tm = at.attribute_trajectory(den, ts, zs, top, labels, maps=want_maps)
        query, t_out = ds[-1], ts.tolist()
        sizes = den.sizes(ts).tolist()
        if verify is not None:  # regenerate the recorded sample from its z_T without the top M
            steps, solver = at.trajectory_settings(ts, zs, ds)
            checks, cf = at.verify_attribution(make, data, shares, verify, zs[0], steps=steps, solver=solver,
                                               original=ds[-1], draws=verify_draws, seed=seed)
            columns = [(f"without top {verify}", cf)]
    else:
        query = at.load_images(image_path, den.shape) if image_path is not None else load_z(z_path, den.shape)
        z = at.forward_query(query, t, seed) if image_path is not None else query
        res, shares, tm = at.attribute(den, z, t, top, labels, maps=want_maps)
        t_out = t
        sizes = den.sizes(torch.tensor([t], dtype=torch.float64)).tolist()
        if verify is not None:  # denoise the same z without the top M
            x = den(z, t).cpu()
            checks, cf = at.verify_attribution(make, data, shares, verify, z, t=t, original=x, draws=verify_draws,
                                               seed=seed)
            columns = [("D(z, t)", x), (f"without top {verify}", cf)]
    for entry in (e for entries in res for e in entries) if classes else ():
        entry["class"] = classes[entry["label"]]  # label i names class i (store metadata "classes")
    rep = {"queries": res, "t": t_out, "patch_size": sizes[0] if len(set(sizes)) == 1 else sizes}
    if checks is not None:
        rep["verify"] = checks
    if panel is not None:
        at.attribution_panel(panel, query, den.data.get(tm.ids), tm.maps, shares.gather(1, tm.ids), columns,
                             names=at.tile_names(den.data, tm.ids))
    write_routing(den, retrieval["report"], echo=not as_json)
    if as_json:
        click.echo(json.dumps(rep))
        return
    for q, entries in enumerate(res):
        click.echo(f"query {q}: " + ", ".join(
            f"{e['index']}{'(flip)' if e['flip'] else ''}={e['share']:.4f}{label_text(e)}" for e in entries))
        if checks is not None:
            click.echo("  " + verify_text(checks[q], verify))
    if panel is not None:
        click.echo(f"wrote {panel}")


def verify_text(v: dict, m: int) -> str:
    """One line of `attribute --verify` text output for a query's `verify_attribution` dict."""
    rel = f" ({v['change_top_rel']:.1%} of the output)" if v["change_top_rel"] is not None else ""
    ratio = f"ratio {v['ratio']:.3g}" if v["ratio"] is not None else "random removal changed nothing"
    return (f"without its top {m}: change {v['change_top']:.4g}{rel}; without {m} random: mean "
            f"{v['change_random_mean']:.4g} over {len(v['change_random'])} draws; {ratio}")


def label_text(entry: dict) -> str:
    """What follows an attribution share in text output: ' [label 3 cat]' (class name if the store has
    them), or '' for a store without labels."""
    if entry.get("label") is None:
        return ""
    return f" [label {entry['label']}{' ' + entry['class'] if 'class' in entry else ''}]"


def main():
    """The console entry point: click's own usage errors (an unknown option, 'ten' for an integer) become
    one line on stderr and exit 2 like every other bad input, instead of click's usage block."""
    try:
        rc = cli.main(prog_name="pspc-index", standalone_mode=False)
    except click.UsageError as e:
        hint = f" (pspc-index {e.ctx.command_path.split(' ', 1)[1]} --help)" if e.ctx and " " in e.ctx.command_path else ""
        fail(e.format_message().splitlines()[0] + hint)
    except click.ClickException as e:
        fail(e.format_message().splitlines()[0])
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
