"""An in-process stand-in for the Hugging Face Hub: each commit is written into a local folder.

The real Hub cannot be reached from the test machines. `FakeHub` replaces, for the duration of a `with` block, the
three names transformers' `push_to_hub` goes through (`hf_api`, `create_and_tag_model_card`, and the Trainer's
`hf_api`), records every commit and writes its files to `root/<owner>__<name>/`, from which `from_pretrained` reloads.
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from huggingface_hub import ModelCard, ModelCardData


@dataclass
class RecordedCommit:
    repo_id: str
    message: str | None
    files: list[str]


@dataclass
class _RepoUrl:
    repo_id: str


@dataclass
class FakeHub:
    root: Path
    commits: list[RecordedCommit] = field(default_factory=list)

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id.replace("/", "__")

    # --- the HfApi methods push_to_hub calls -------------------------------------------------------------------
    def create_repo(self, repo_id, private=None, token=None, exist_ok=False, **kwargs):
        if "/" not in repo_id:
            repo_id = f"fake-user/{repo_id}"
        self.repo_dir(repo_id).mkdir(parents=True, exist_ok=True)
        return _RepoUrl(repo_id)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        target = self.repo_dir(repo_id)
        files = []
        for op in operations:
            destination = target / op.path_in_repo
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, destination)
            files.append(op.path_in_repo)
        self.commits.append(RecordedCommit(repo_id, commit_message, sorted(files)))
        return f"https://fake.hub/{repo_id}/commit/{len(self.commits)}"

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        files = [p for p in Path(folder_path).rglob("*") if p.is_file()]
        ops = [mock.Mock(path_in_repo=str(p.relative_to(folder_path)), path_or_fileobj=str(p)) for p in files]
        return self.create_commit(repo_id, ops, commit_message=commit_message)

    # --- transformers.utils.hub.create_and_tag_model_card --------------------------------------------------------
    def model_card(self, repo_id, tags=None, token=None):
        readme = self.repo_dir(repo_id) / "README.md"
        if readme.is_file():
            card = ModelCard(readme.read_text())
        else:  # what transformers creates for a repository without a card
            card = ModelCard.from_template(
                ModelCardData(tags=list(tags or []), library_name="transformers"),
                model_description="This model card has been automatically generated.",
            )
        card.data.tags = sorted({*(card.data.tags or []), *(tags or [])})  # as transformers tags an existing card
        return card

    def __enter__(self):
        self._patches = [
            mock.patch("transformers.utils.hub.hf_api", lambda: self),
            mock.patch("transformers.utils.hub.create_and_tag_model_card", self.model_card),
        ]
        for patch in self._patches:
            patch.start()
        return self

    def __exit__(self, *exc):
        for patch in reversed(self._patches):
            patch.stop()
