"""The publish layout of formats whose every variant is a whole model folder: one branch per variant."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from quantkit.backends.base import BackendBase, Entries, relative_path
from quantkit.workspace import Workspace


class FolderPerBranch(BackendBase):
    """A format whose every variant is a whole model folder published on a branch of its own, named after the
    folder (``8bit-g128``), the recommended one on ``main`` so that loading the repo without a revision works (GPTQ,
    AWQ, MLX; EXL2 keeps ``main`` for its card and measurement)."""

    main_branch_variant = True

    def branches(self, arts: Entries) -> dict[str, str]:
        if not arts:
            return {}
        main = self.recommended(arts)[0] if self.main_branch_variant else None
        return {k: "main" if k == main else PurePosixPath(k).name for k, _ in arts}

    def repo_path(self, ws: Workspace, key: str, file: Path | None) -> str:
        """Inside the artifact's folder: each variant is a whole model on its own branch."""
        return super().repo_path(ws, key, file) if file is None else relative_path(file, ws.abs(key))
