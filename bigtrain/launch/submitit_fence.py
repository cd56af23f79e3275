"""Every use of submitit's private API, in one place, checked against the tested version.

bigtrain submits through submitit's public executor API except for two things it does not offer: the sbatch
script as text (`--dry-run`), and #SBATCH values quoted the way SLURM reads them back (submitit shell-quotes
them, and SLURM's #SBATCH parser loses a backslash). Both override or call `SlurmExecutor` internals
(`_make_submission_file_text`, `_submitit_command_str`, the `affinity` classmethod).
"""
from __future__ import annotations

import re
import shlex
import shutil

from ..errors import BigtrainError

TESTED = ("1.5.4",)
_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def check_version() -> None:
    import submitit
    if submitit.__version__ not in TESTED:
        raise BigtrainError(f"submitit {submitit.__version__} is installed; bigtrain uses submitit internals tested "
                            f"with {', '.join(TESTED)} only (pip install submitit=={TESTED[-1]})")


def slurm_quote(value) -> str:
    """A value as SLURM's #SBATCH parser reads it back unchanged: double quotes group, a backslash
    escapes the next character. (submitit shell-quotes these values, which SLURM does not read back
    exactly: a backslash is lost.)"""
    value = str(value)
    if _SAFE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def requote_sbatch(text: str) -> str:
    out = []
    for line in text.split("\n"):
        m = re.fullmatch(r"#SBATCH --([A-Za-z0-9_-]+)=(.*)", line)
        if m:
            (value,) = shlex.split(m.group(2))  # undoes submitit's shlex.quote
            line = f"#SBATCH --{m.group(1)}={slurm_quote(value)}"
        out.append(line)
    return "\n".join(out)


def executor_class():
    from submitit.slurm.slurm import SlurmExecutor

    class BigtrainExecutor(SlurmExecutor):
        allow_without_slurm = False

        @classmethod
        def affinity(cls) -> int:
            return 2 if cls.allow_without_slurm or shutil.which("srun") else -1

        def _make_submission_file_text(self, command: str, uid: str) -> str:
            return requote_sbatch(super()._make_submission_file_text(command, uid))

    return BigtrainExecutor


def sbatch_script(executor) -> str:
    """The sbatch script submitit writes for this executor (what --dry-run prints)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")
