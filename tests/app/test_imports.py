"""The api's modules import without torch or worker code, and each one imports on its own.

Both run in fresh interpreters: in this one, other tests have long since imported everything, which would
hide an import cycle that only works in one order and a heavy import that only some path pulls in.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import app
names = [m.name for m in pkgutil.walk_packages(app.__path__, "app.", onerror=lambda name: None)]
for name in names:
    importlib.import_module(name)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "worker", "torchvision"})
print(json.dumps({"modules": names, "heavy": heavy}))
"""

# Third-party libraries are imported once; then each app module is imported in a forked child that has no
# app module loaded yet, so it must import alone, whatever order the others would have been imported in.
_IMPORT_EACH_ALONE = """
import json, os, sys, traceback
import alembic, celery, fastapi, pydantic, sqlalchemy, starlette
failures = {}
for name in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            __import__(name)
            message = ""
        except BaseException:
            message = traceback.format_exc(limit=-3)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    if message:
        failures[name] = message
print(json.dumps(failures))
"""


def _python(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _app_modules() -> tuple[list[str], list[str]]:
    found = json.loads(_python(_IMPORT_ALL))
    return found["modules"], found["heavy"]


def test_the_app_package_imports_neither_torch_nor_worker_code() -> None:
    modules, heavy = _app_modules()

    assert {"app.main", "app.tables", "app.domain", "app.jobs.service", "app.models.service"} <= set(modules)
    assert heavy == []


def test_each_app_module_imports_on_its_own() -> None:
    modules, _heavy = _app_modules()

    failures = json.loads(_python(_IMPORT_EACH_ALONE, json.dumps(modules)))

    assert failures == {}


def test_the_model_registry_does_not_import_the_job_service() -> None:
    """The job service resolves models through the registry; the registry queues jobs one level lower."""
    code = "import sys, app.models.service; print(sorted(m for m in sys.modules if m.startswith('app.jobs')))"

    assert json.loads(_python(code).replace("'", '"')) == [
        "app.jobs",
        "app.jobs.params",
        "app.jobs.submission",
    ]
