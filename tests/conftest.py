"""Shared fixtures: a tiny random Phi-3.5-vision with the real tokenizer, and a script runner.

Everything runs offline on CPU: no hub, no GPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# The longest files first, as measured on 2 cores (a learning test trains for minutes; the crash and
# distributed tests start several processes). `scripts/test.sh` runs pytest-xdist with --dist loadfile
# --no-loadscope-reorder, which hands files out in collection order: left to itself xdist orders them by
# their number of tests, so the long learning files, with 1-3 tests each, started last and one worker
# ran them alone at the end. Test files named test_learning_* that are not listed come first of all.
LONGEST_FILES_FIRST = [
    "test_learning_own_data.py",
    "test_learning_memes_nlvr2.py",
    "test_learning_ucf101.py",
    "test_learning_docvqa.py",
    "test_crash_resume.py",
    "test_distributed.py",
    "test_use_finetuned.py",
    "test_hateful_memes.py",
    "test_nlvr2.py",
    "test_preflight_ucf101.py",
    "test_preflight_hateful_memes.py",
    "test_preflight_nlvr2.py",
    "test_preflight_docvqa.py",
    "test_ucf101.py",
    "test_docvqa.py",
    "test_bench.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}

    def order(item):
        name = item.path.name
        if name in rank:
            return rank[name]
        return -1 if name.startswith("test_learning_") else len(rank)

    items.sort(key=order)  # stable: each file's tests keep their order


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread in this process for a module that trains in-process: the tiny model's ops are
    too small to share, and on a busy 2-core machine a second thread makes steps many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """`python -m phi3v.tiny` output (num_crops 4 in preprocessor_config.json)."""
    from phi3v.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-phi3v"))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny model in eval mode, loaded once per test module (a module may define its own)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    """The tiny model's processor (num_crops 4), once per test module (a module may define its own)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(extra or {})
    return env


@pytest.fixture
def run_script():
    """Run a top-level script as users do; returns the CompletedProcess (stdout+stderr in .stdout).

    nproc=None: `python script.py ...` (one process, no distributed env);
    nproc="single": one process with the torch.distributed variables set (DeepSpeed needs them);
    nproc=N: `torchrun --nproc_per_node=N script.py ...`.
    """

    def run(script: str, *args, nproc=None, env=None, timeout=900, check=True):
        args = [str(a) for a in args]
        extra = dict(env or {})
        if nproc is None:
            cmd = [sys.executable, str(REPO / script), *args]
        elif nproc == "single":
            extra.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            cmd = [sys.executable, str(REPO / script), *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", str(REPO / script), *args]
            extra.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run(cmd, cwd=REPO, env=script_env(extra), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-8000:]}")
        return proc

    return run


@pytest.fixture
def run_main(capfd):
    """Run a top-level script's main(argv) in this process, one torch thread; returns a CompletedProcess
    (what it printed to stdout and stderr in .stdout, SystemExit's code in .returncode).

    For runs whose process boundary is not what the test checks (no DeepSpeed, torchrun, exit status of a
    crash or kill): it saves the ~5 CPU-seconds a subprocess spends importing torch, transformers and the
    script, many times over in the suite.
    """
    import importlib.util
    import logging
    import warnings

    import torch

    def run(script: str, *args, check=True):
        argv = [str(a) for a in args]
        spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        capfd.readouterr()
        code = 0
        # Library log handlers (transformers', datasets', ...) keep the sys.stderr of the moment they were
        # made, maybe an earlier test's closed capture: for this run they write to stderr, as in a fresh process.
        handlers = [h for logger in [logging.root, *logging.root.manager.loggerDict.values()]
                    for h in getattr(logger, "handlers", []) if type(h) is logging.StreamHandler]
        saved = [(h.stream, h.__dict__.get("flush")) for h in handlers]
        for handler in handlers:
            handler.stream = sys.stderr  # not setStream: it would flush the old, maybe closed, stream
            if "flush" in handler.__dict__:  # transformers binds its handler's flush to that sys.stderr too
                handler.flush = sys.stderr.flush
        # Warnings as a fresh process prints them to stderr (pytest would otherwise collect them).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                module.main(argv)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
                if exit.code is not None and not isinstance(exit.code, int):
                    print(exit.code, file=sys.stderr)  # as the interpreter prints sys.exit("message")
            finally:
                torch.set_num_threads(threads)
                for handler, (stream, flush) in zip(handlers, saved):
                    handler.stream = stream
                    if flush is not None:
                        handler.flush = flush
                out, err = capfd.readouterr()
        err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
        proc = subprocess.CompletedProcess([script, *argv], code, out + err)
        if check and code != 0:
            raise AssertionError(f"{script} {' '.join(argv)} exited {code}:\n{proc.stdout[-8000:]}")
        return proc

    return run


@pytest.fixture
def drawn_figures(monkeypatch) -> dict:
    """What every matplotlib figure saved during the test drew, by file name.

    `drawn["loss_curve.png"]` maps each line's label to its [x, y] points (over all axes);
    `drawn["loss_curve.png axes"]` lists each axis' (xlabel, ylabel). The files are written as usual.
    """
    from matplotlib.figure import Figure

    drawn = {}
    savefig = Figure.savefig

    def record(fig, path, *args, **kwargs):
        name = Path(path).name
        drawn[name] = {line.get_label(): line.get_xydata().tolist() for ax in fig.axes for line in ax.get_lines()}
        drawn[name + " axes"] = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return drawn
