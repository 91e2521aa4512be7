#!/usr/bin/env bash
# Build nftsync's Debian package out of tree:
#
#   scripts/build-deb.sh [--lintian] OUTDIR
#
# Copies the tree (the files git tracks or would track, as they are on disk: uncommitted edits
# included, ignored files such as .venv left out) to a temporary directory, runs
# `dpkg-buildpackage -us -uc -b` there and moves the .deb, .buildinfo and .changes into OUTDIR;
# the last line printed is the .deb's path. Nothing is written in the tree. --lintian also runs
# lintian on the result and fails on any error or warning.
# Refuses to build when debian/changelog's version is not nftsync.__version__ (the one source of
# the version: pyproject.toml reads it too). Needs the build dependencies (scripts/setup.sh
# installs them), not root.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

die() { echo "build-deb.sh: $*" >&2; exit 1; }

lintian=0
if [[ "${1:-}" == --lintian ]]; then
    lintian=1
    shift
fi
(($# == 1)) || die "usage: scripts/build-deb.sh [--lintian] OUTDIR"
OUT=$(realpath -m -- "$1")
case "$OUT/" in
"$ROOT"/*) die "OUTDIR $OUT is inside the tree; give a directory outside it" ;;
esac
mkdir -p -- "$OUT"

# Debian's own tools and python3, not a venv's or pyenv's found first on PATH.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH VIRTUAL_ENV PYTHONHOME

version=$(python3 - "$ROOT/nftsync/__init__.py" <<'EOF'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
print(next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
           and any(getattr(t, "id", None) == "__version__" for t in n.targets)))
EOF
) || die "cannot read __version__ from nftsync/__init__.py"
debversion=$(dpkg-parsechangelog -l "$ROOT/debian/changelog" -S Version) ||
    die "cannot read debian/changelog"
if [[ "${debversion%-*}" != "$version" ]]; then
    die "debian/changelog says $debversion but nftsync.__version__ is $version; add a changelog" \
        "entry (dch -v $version) or fix the version"
fi
dpkg-checkbuilddeps "$ROOT/debian/control" ||
    die "missing build dependencies (scripts/setup.sh installs them)"

git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "$ROOT is not a git checkout"
work=$(mktemp -d "${TMPDIR:-/tmp}/nftsync-deb.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
src="$work/nftsync-$version"
mkdir "$src"
# Tracked and untracked-but-not-ignored files that exist (a deleted file is not copied).
git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
    (cd "$ROOT" && while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done) |
    tar -C "$ROOT" --null -T - -cf - | tar -C "$src" -xf -

start=$(date +%s)
(cd "$src" && dpkg-buildpackage -us -uc -b) >&2 || die "dpkg-buildpackage failed (output above)"
echo "build-deb.sh: built in $(($(date +%s) - start)) s" >&2

deb="$work/nftsync_${debversion}_all.deb"
[[ -f "$deb" ]] || die "dpkg-buildpackage made no $deb"
if ((lintian)); then
    lintian --fail-on error,warning "$deb" >&2 || die "lintian found problems (above)"
fi
mv -f -- "$work"/nftsync_"${debversion}"_*.{deb,buildinfo,changes} "$OUT"/
echo "$OUT/$(basename "$deb")"
