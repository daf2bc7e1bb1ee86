"""The package installs like its ecosystem's: pip builds it from source with every extra into a
fresh virtual environment, each console script answers ``--help`` from there, and the recipes
(``experiments/`` = ``gist_jax.experiments``) come with it.

Nothing is downloaded: the fresh environment sees the running interpreter's site-packages through
a .pth line (so torch, tensorflow, jax... are not fetched again), and pip runs with ``--no-index``
and ``--no-build-isolation``. pip still resolves every declared dependency and extra against the
distributions it sees, so a requirement that the lock (requirements.txt) does not satisfy fails
here. About 30-60 s on 2 cores, most of it the scripts' imports of jax.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
EXTRAS = sorted(PYPROJECT["project"]["optional-dependencies"])
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def module_of(target: str) -> str:
    """``gist_jax.bench.__main__:run`` -> ``gist_jax.bench`` (what ``python -m`` runs)."""
    return target.split(":")[0].removesuffix(".__main__")


def test_every_package_folder_is_listed():
    """The package list is explicit (find cannot see the experiments/ mapping): a new package
    folder that is not listed would be missing from every install but a checkout."""
    mapped = {pathlib.Path(where): name for name, where in SETUPTOOLS["package-dir"].items()}
    found = set()
    for init in [*REPO.glob("gist_jax/**/__init__.py"), *REPO.glob("launch/**/__init__.py"),
                 *REPO.glob("experiments/**/__init__.py")]:
        rel = init.parent.relative_to(REPO)
        top = next((p for p in mapped if rel == p or p in rel.parents), None)
        name = ".".join(rel.parts) if top is None else ".".join([mapped[top], *rel.relative_to(top).parts])
        found.add(name)
    assert found == set(SETUPTOOLS["packages"]), "pyproject.toml [tool.setuptools] packages must list every package"


def test_every_script_points_at_a_module_that_exists():
    for name, target in SCRIPTS.items():
        assert name.startswith("gist-"), name
        module, _, func = target.partition(":")
        path = REPO / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"{name}: {path} missing"
        assert f"def {func}(" in path.read_text(), f"{name}: no {func}() in {path}"


def _copy_source(dest: pathlib.Path) -> pathlib.Path:
    """What a source distribution holds: pyproject.toml, the readme and the package folders (so the
    build writes its build/ and egg-info there, not into the checkout)."""
    tops = {p.split(".")[0] for p in SETUPTOOLS["packages"]} - set(SETUPTOOLS["package-dir"])
    tops |= set(SETUPTOOLS["package-dir"].values())
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    dest.mkdir()
    for top in sorted(tops):
        shutil.copytree(REPO / top, dest / top, ignore=ignore)
    for name in ("pyproject.toml", PYPROJECT["project"]["readme"]):
        shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> pathlib.Path:
    """A new venv with the project pip-installed from its source, every extra included."""
    root = tmp_path_factory.mktemp("packaging")
    source = _copy_source(root / "source")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    env_python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(env_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # The running interpreter's packages, after the fresh env's own (so the install shadows the
    # checkout's editable gist_jax; .pth files in that folder, its editable finder among them, are
    # not processed from here).
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (pathlib.Path(purelib) / "outer_site_packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    spec = f"{source}[{','.join(EXTRAS)}]"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env_python), "install", "--no-index", "--no-build-isolation",
         "--no-cache-dir", "--disable-pip-version-check", "-q", spec],
        capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert install.returncode == 0, f"pip install {spec} failed:\n{install.stdout}\n{install.stderr}"
    return env_dir


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PIP_NO_INPUT": "1"}


def test_the_install_is_the_wheel_not_the_checkout(fresh_env, tmp_path):
    code = ("import pathlib, gist_jax, gist_jax.experiments as e, gist_jax.experiments.demo as d; "
            "print(pathlib.Path(gist_jax.__file__).parent); print(e.DIR); "
            "print(e.resolve_config('experiments/demo.py:tiny')); "
            "print(d.get_config('tiny').model.init); print(sorted(p.name for p in (e.DIR / 'sweeps').glob('*.py')))")
    out = subprocess.run([str(fresh_env / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=_env(), check=True).stdout.splitlines()
    site = str(fresh_env)
    package, experiments, resolved, init, sweeps = out
    assert package.startswith(site) and experiments.startswith(site), out
    assert experiments == str(pathlib.Path(package) / "experiments")
    assert resolved == f"{experiments}/demo.py:tiny"  # no experiments/ here: the packaged recipe
    assert init == "preset:tiny"
    assert "tiny_variants.py" in sweeps


def test_a_config_flag_loads_the_packaged_recipe(fresh_env, tmp_path):
    """``--config experiments/demo.py:tiny`` outside a checkout loads the installed recipe."""
    code = ("from absl import flags; from gist_jax import experiments; fv = flags.FlagValues(); "
            "argv = ['x', '--config', 'experiments/demo.py:tiny', '--config.train.eval_every=3']; "
            "h = experiments.DEFINE_config_file('config', None, '', flag_values=fv, sys_argv=argv); fv(argv); "
            "print(h.value.model.init, h.value.train.eval_every)")
    out = subprocess.run([str(fresh_env / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=_env(), check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["preset:tiny", "3"]


def _help(script: pathlib.Path, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=cwd, env=_env(),
                          timeout=240, check=False)


def test_every_console_script_answers_help(fresh_env, tmp_path):
    bin_dir = fresh_env / "bin"
    for name in SCRIPTS:
        assert (bin_dir / name).is_file(), f"{name} not installed"
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(SCRIPTS, pool.map(lambda n: _help(bin_dir / n, tmp_path), SCRIPTS), strict=True))
    failures = []
    for name, result in results.items():
        out = result.stdout + result.stderr
        # absl apps (gist-train, gist-demo) exit 1 after --help by absl's design; argparse ones 0.
        absl_help = result.returncode == 1 and "Try --helpfull" in out
        if result.returncode != 0 and not absl_help:
            failures.append(f"{name}: exit {result.returncode}\n{out[-2000:]}")
        elif name not in out and module_of(SCRIPTS[name]) not in out:
            failures.append(f"{name}: --help does not name the tool\n{out[:500]}")
    assert not failures, "\n\n".join(failures)
