"""The CORE eval bundle (DCLM's core.yaml, eval_meta_data.csv and eval_data/): download once, locate, check.

    python -m jaxchat.core_eval --download      # (or python -m jaxchat.core_bundle --download) into
                                                # $JAXCHAT_BASE_DIR/eval_bundle

As nanochat's scripts/base_eval.py place_eval_bundle with nanochat/common.py download_file_with_lock: one download
per machine under a file lock, the archive extracted beside the destination and renamed into place.
"""

import argparse
import fcntl
import os
import zipfile

from jaxchat.data.download import build_directory, fetch
from jaxchat.runtime.common import JAXCHAT_ONLY, UserError, base_dir, cli_parser, user_path

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
DOWNLOAD_COMMAND = "python -m jaxchat.core_eval --download"
BUNDLE_FILES = ("core.yaml", "eval_meta_data.csv", "eval_data")


def restore_command(bundle: str) -> str:
    """The command that puts a damaged bundle back where it is: a --bundle of the user's own is fetched there, not to
    $JAXCHAT_BASE_DIR/eval_bundle (which the bare download command fills)."""
    same = os.path.abspath(bundle) == os.path.abspath(default_bundle_dir())
    return f"rm -r {bundle} && {DOWNLOAD_COMMAND}" + ("" if same else f" --dest {bundle}")


def default_bundle_dir() -> str:
    """$JAXCHAT_BASE_DIR/eval_bundle, where nanochat's base_eval keeps it too."""
    return os.path.join(base_dir(), "eval_bundle")


def is_bundle(path: str) -> bool:
    """Whether `path` holds a bundle's three entries."""
    return all(os.path.exists(os.path.join(path, name)) for name in BUNDLE_FILES)


def bundle_root(path: str) -> str | None:
    """The bundle directory inside an extracted zip (the archive holds a top-level eval_bundle/ folder)."""
    if is_bundle(path):
        return path
    for name in sorted(os.listdir(path)):
        if is_bundle(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def lock_path(dest: str) -> str:
    """The lock file beside `dest` that serialises downloads (one downloader per machine / shared filesystem)."""
    return os.path.join(os.path.dirname(os.path.abspath(dest)), f".{os.path.basename(dest)}.lock")


def download_bundle(url: str = EVAL_BUNDLE_URL, dest: str | None = None) -> str:
    """Download and unzip the eval bundle to `dest` (default $BASE/eval_bundle) once, under a file lock; return dest."""
    dest = os.path.abspath(dest or default_bundle_dir())
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    # Other processes wait on the lock and then find the finished directory.
    with open(lock_path(dest), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_bundle(dest):
            return dest
        zip_path = os.path.join(parent, "eval_bundle.zip")
        if not os.path.exists(zip_path):
            try:
                fetch(url, zip_path, progress="eval_bundle.zip")
            except OSError as e:  # URLError, timeouts and connection resets are all OSErrors
                raise UserError(f"cannot download the CORE eval bundle from {url} ({e}); run `{DOWNLOAD_COMMAND}` "
                                f"on a machine with network access and copy its eval_bundle folder to {dest}") from None
        build_directory(dest, lambda tmp: _extract(zip_path, tmp, url), is_bundle)
    return dest


def _extract(zip_path: str, tmp: str, url: str) -> str:
    """Unzip into tmp; the bundle directory inside it."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
    except zipfile.BadZipFile:
        os.remove(zip_path)  # a truncated download; the next attempt fetches it again
        raise UserError(f"{zip_path} is not a valid zip file (removed); run `{DOWNLOAD_COMMAND}` again") from None
    root = bundle_root(tmp)
    if root is None:
        raise UserError(f"{url} does not contain {' / '.join(BUNDLE_FILES)}")
    return root


def find_bundle(path: str | None = None, download: bool = True) -> str:
    """The bundle to use: `path` if given (must exist), else $BASE/eval_bundle, downloading it when missing."""
    if path is not None:
        if not is_bundle(path):
            raise UserError(f"{path} is not a CORE eval bundle (needs core.yaml, eval_meta_data.csv and eval_data/); "
                            f"`{DOWNLOAD_COMMAND}` fetches the real one to {default_bundle_dir()}")
        return path
    path = default_bundle_dir()
    if is_bundle(path):
        return path
    if not download:
        raise UserError(f"CORE eval bundle not found at {path}: run `{DOWNLOAD_COMMAND}` first")
    return download_bundle(dest=path)


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m jaxchat.core_eval` / `python -m jaxchat.core_bundle`."""
    p = cli_parser(__doc__)
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                   help=JAXCHAT_ONLY + "download and unzip the CORE eval bundle (base_eval also does it on first use)")
    p.add_argument("--url", default=EVAL_BUNDLE_URL, help=JAXCHAT_ONLY + "where to download the bundle from")
    p.add_argument("--dest", default=None, type=user_path,
                   help=JAXCHAT_ONLY + "bundle directory (default: $JAXCHAT_BASE_DIR/eval_bundle)")
    return p


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if not args.download:
        p.error("nothing to do: pass --download (CORE itself runs from python -m jaxchat.base_eval)")
    path = download_bundle(args.url, args.dest)
    import yaml

    with open(os.path.join(path, "core.yaml"), encoding="utf-8") as f:
        print(f"CORE eval bundle ready at {path}: {len(yaml.safe_load(f)['icl_tasks'])} tasks")
