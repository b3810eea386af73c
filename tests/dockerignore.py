"""What a Docker build context sends, by Docker's own rules (BuildKit's .dockerignore reader and moby's
pattern matcher), so a test can list the files `docker build` would upload without a Docker daemon.

No PyPI package implements these rules faithfully: docker-py's matcher lowercases paths and patterns and
checks only one parent directory. The rules, as moby/patternmatcher and BuildKit's ignorefile apply them:

- reading the file: lines starting with `#` are comments; each line is trimmed; a leading `!` marks an
  exception; the rest is cleaned like Go's `filepath.Clean` and a leading `/` dropped;
- each pattern is Go `filepath.Match` syntax turned into a regular expression: `*` and `?` never match `/`,
  `**` matches any number of directories (also none), `\\` escapes the next character, `[...]` is a class;
  a pattern without wildcards compares literally, `X**` is a prefix test, `**X` (X literal) a suffix test;
- a path is excluded when the last pattern that matches it, or one of its parent directories, is not an
  exception (the last match wins).
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

# Characters that are special in a regular expression but literal in a filepath.Match pattern.
_REGEX_ONLY = set(".+()|{}$")


def go_clean(path: str) -> str:
    """Go's path/filepath.Clean on a slash-separated path."""
    if not path:
        return "."
    cleaned = posixpath.normpath(path)
    # POSIX keeps a leading '//', Go collapses it.
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def read_dockerignore(text: str) -> list[str]:
    """The patterns of a .dockerignore file, normalised as BuildKit reads them."""
    patterns = []
    for number, line in enumerate(text.splitlines()):
        if number == 0:
            line = line.removeprefix("\ufeff")
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        invert = line.startswith("!")
        if invert:
            line = line[1:].strip()
        if line:
            line = go_clean(line)
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]
        patterns.append(("!" if invert else "") + line)
    return patterns


class Pattern:
    def __init__(self, text: str, exclusion: bool):
        self.text = text
        self.exclusion = exclusion
        self.kind, self.regex = self._compile(text)

    @staticmethod
    def _compile(pattern: str) -> tuple[str, re.Pattern | None]:
        out = ["^"]
        kind = "exact"
        i, n = 0, len(pattern)
        position = 0
        while i < n:
            ch = pattern[i]
            i += 1
            if ch == "*":
                if i < n and pattern[i] == "*":
                    i += 1
                    if i < n and pattern[i] == "/":
                        i += 1
                    if i >= n:
                        if kind == "exact":
                            kind = "prefix"
                        else:
                            out.append(".*")
                            kind = "regex"
                    else:
                        out.append("(.*/)?")
                        kind = "regex"
                    if position == 0:
                        kind = "suffix"
                else:
                    out.append("[^/]*")
                    kind = "regex"
            elif ch == "?":
                out.append("[^/]")
                kind = "regex"
            elif ch in _REGEX_ONLY:
                out.append("\\" + ch)
            elif ch == "\\":
                if i < n:
                    out.append("\\" + pattern[i])
                    i += 1
                    kind = "regex"
                else:
                    out.append("\\\\")
            elif ch in "[]":
                out.append(ch)
                kind = "regex"
            else:
                out.append(ch)
            position += 1
        if kind != "regex":
            return kind, None
        try:
            return kind, re.compile("".join(out) + "$", re.DOTALL)
        except re.error as e:
            raise ValueError(f"bad .dockerignore pattern {pattern!r}: {e}") from None

    def match(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.text
        if self.kind == "prefix":
            return path.startswith(self.text[:-2])
        if self.kind == "suffix":
            suffix = self.text[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        return self.regex.match(path) is not None


class PatternMatcher:
    """moby's PatternMatcher: `excluded(path)` is MatchesOrParentMatches."""

    def __init__(self, patterns: list[str]):
        self.patterns: list[Pattern] = []
        for raw in patterns:
            raw = raw.strip()
            if not raw:
                continue
            raw = go_clean(raw)
            exclusion = raw.startswith("!")
            if exclusion:
                if len(raw) == 1:
                    raise ValueError('illegal exclusion pattern: "!"')
                raw = raw[1:]
            self.patterns.append(Pattern(raw, exclusion))

    def excluded(self, path: str) -> bool:
        path = go_clean(path)
        if path == ".":
            return False
        parent = posixpath.dirname(path) or "."
        parents = parent.split("/")
        matched = False
        for pattern in self.patterns:
            # An inclusion cannot change an excluded path, nor an exception an included one.
            if pattern.exclusion != matched:
                continue
            hit = pattern.match(path)
            if not hit and parent != ".":
                hit = any(pattern.match("/".join(parents[: k + 1])) for k in range(len(parents)))
            if hit:
                matched = not pattern.exclusion
        return matched

    def may_include_below(self, directory: str) -> bool:
        """Whether an exception could re-include something under an excluded directory (walk pruning only)."""
        depth = directory.count("/") + 1
        for pattern in self.patterns:
            if not pattern.exclusion:
                continue
            if "**" in pattern.text:
                return True
            parts = pattern.text.split("/")
            if len(parts) <= depth:
                continue
            if all(Pattern(p, False).match(d) for p, d in zip(parts, directory.split("/"))):
                return True
        return False


def context_files(root: Path, dockerignore: str) -> list[str]:
    """The regular files (and links) under root that a build with this .dockerignore text sends."""
    matcher = PatternMatcher(read_dockerignore(dockerignore))
    sent: list[str] = []
    for current, dirs, files in os.walk(root):
        rel_dir = Path(current).relative_to(root).as_posix()
        keep = []
        for d in sorted(dirs):
            rel = d if rel_dir == "." else f"{rel_dir}/{d}"
            if not matcher.excluded(rel) or matcher.may_include_below(rel):
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            rel = f if rel_dir == "." else f"{rel_dir}/{f}"
            if not matcher.excluded(rel):
                sent.append(rel)
    return sorted(sent)
