"""A clean install: the wheel ships ``optax_ext`` alone and works from a fresh virtualenv.

The wheel is built from a copy of the repository (without build isolation when setuptools >= 77
is installed, as in ``make test``'s venv; otherwise pip fetches the build backend from the
index). It is installed with ``--no-deps`` into a new venv that sees this interpreter's
site-packages (jax, optax, flax, chex) as plain paths, so the editable install of the repository
is not visible there; a usage example with its own model then runs against the installed copy.
"""

import importlib.metadata
import pathlib
import shutil
import site
import subprocess
import sys
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

USAGE = r'''
import importlib.util, pathlib, sys
import flax.linen as nn, jax, jax.numpy as jnp, optax
import optax_ext

assert pathlib.Path(optax_ext.__file__).is_relative_to(pathlib.Path(sys.prefix)), optax_ext.__file__
for name in ("models", "experiments"):
    assert importlib.util.find_spec(name) is None, f"the wheel installed {name}"

class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Embed(32, 16)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(x)
        return nn.Dense(32, name="logits")(nn.gelu(nn.Dense(32)(x)))

x = jax.random.randint(jax.random.key(0), (4, 8), 0, 32)
params = Net().init(jax.random.key(1), x)["params"]
print(optax_ext.labels.describe(params, optax_ext.muon))
tx = optax_ext.muon(optax.warmup_cosine_decay_schedule(0.0, 0.02, 5, 40))

def loss(p):
    logits = Net().apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, x).mean()

@jax.jit
def step(p, s):
    value, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, value

state = tx.init(params)
first = None
for _ in range(40):
    params, state, value = step(params, state)
    first = value if first is None else first
print("loss", float(first), "->", float(value))
assert float(value) < float(first)
'''


def _setuptools_ok() -> bool:
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return major >= 77


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_ships_optax_ext_alone_and_runs_from_a_fresh_venv(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("optax_ext", "models", "experiments"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)]
    if _setuptools_ok():
        cmd.insert(4, "--no-build-isolation")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 and not _setuptools_ok():
        pytest.skip(f"no setuptools>=77 here and pip could not fetch it: {out.stderr[-500:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = dist.glob("optax_ext-*.whl")

    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"optax_ext"}, tops
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("/METADATA"))
    requires = [
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert sorted(r.split(">")[0] for r in requires) == ["chex", "flax", "jax", "optax"], requires

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = next(p for p in (env_dir / "bin" / "python", env_dir / "Scripts" / "python.exe")
              if p.exists())
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    # this interpreter's packages as plain paths: no .pth processing, so no editable finder
    deps = [p for p in site.getsitepackages() if pathlib.Path(p).is_dir()]
    (pathlib.Path(purelib.stdout.strip()) / "_deps.pth").write_text("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
          "--no-index", "-q", str(wheel)])
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    out = _run([str(py), "-c", USAGE], cwd=run_dir, timeout=600)
    assert "query/kernel" in out.stdout and "loss" in out.stdout
