"""Input formats, read in bounded chunks of Arrow columns (never the whole file at once).

* ``TsvSource``: a directory of ``train.txt``, ``valid.txt``, ``test.txt`` and optionally
  ``valid_negatives.txt``, ``test_negatives.txt`` (facts known to be false), one
  ``head<TAB>relation<TAB>tail`` per line (plain or gzipped), names as strings.
* ``NTriplesSource``: N-Triples files (``<s> <p> <o> .``), plain or gzipped, as in the Freebase RDF
  dump. Triples with a literal object are skipped and counted; an optional predicate allow-list.
* ``DglKeSource``: the DGL-KE / OpenKE layout of Freebase86m: ``entity2id.txt`` and
  ``relation2id.txt`` (first line a count, then ``name<TAB>id``) and integer triples in
  **head, tail, relation** order; optional ``valid_negatives.txt``, ``test_negatives.txt`` alike.

Parsing is vectorised (pyarrow's CSV reader, RE2 regexes over whole blocks). When a chunk holds a
malformed line, the file is scanned once more line by line to name the exact line number: the slow
path runs only on the way to an error.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from sharding.kernels import native
from storage.layout import ALL_SPLITS, SPLITS, SplitCounts

BLOCK_BYTES = 1 << 24
CSV_BLOCK_BYTES = 1 << 22
"""The block pyarrow's CSV reader parses at a time (in parallel): a line longer than about twice this
"straddles" blocks and is refused, so a block holding one is parsed again as a single piece."""
LARGEST_CSV_BLOCK = (1 << 31) - 1
"""pyarrow's block size is a 32-bit integer."""
BOM = b"\xef\xbb\xbf"
"""UTF-8's byte-order mark: dropped where it opens a file (pyarrow's CSV reader drops it too)."""
SKIP_HINT = "(convert it with `python -m storage convert ... --skip-bad-lines` to skip such lines)"
"""How to get past bad lines: said in the same words to the converter's and the trainer's users (the trainer
converts through this code, but only ``python -m storage convert`` has the option)."""
T = TypeVar("T")


def open_text(path: Path):
    """A binary stream of a plain or gzipped file."""
    return gzip.open(path, "rb") if Path(path).suffix == ".gz" else open(path, "rb")


@contextmanager
def gzip_errors_named(path: Path) -> Iterator[None]:
    """Turn a damaged gzip stream's errors into a ValueError naming the file: gzip's own (EOFError for a
    truncated file, "Not a gzipped file (b'..')" for another format) name none."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: not a complete gzip file ({err})") from err


def numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Each line's number (1-based) and bytes without its line break; a BOM opening the file dropped."""
    with gzip_errors_named(path), open_text(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip(b"\n").rstrip(b"\r")
            yield number, (line.removeprefix(BOM) if number == 1 else line)


def first_problem(path: Path, problem: Callable[[int, bytes], str | None]) -> tuple[int, bytes, str] | None:
    """The number, bytes and problem of the first line for which ``problem(number, line)`` names one."""
    for number, line in numbered_lines(path):
        if (found := problem(number, line)) is not None:
            return number, line, found
    return None


def shown(line: bytes) -> str:
    """A line as an error message quotes it: its start, undecodable bytes replaced."""
    return line[:120].decode("utf-8", errors="replace")


def unexplained(path: Path, parser_error: str | None) -> ValueError:
    """The last resort when no line checker recognises what the CSV parser refused: its own words."""
    reason = f" (pyarrow: {parser_error})" if parser_error else ""
    return ValueError(f"{path}: the CSV parser rejected a block, but no line of it is malformed{reason}")


def first_bad_line(path: Path, is_bad: Callable[[bytes], bool], parser_error: str | None = None) -> tuple[int, str]:
    """Line number (1-based) and text of the first line ``is_bad`` rejects; ``parser_error`` (the parser's
    message, when a parser's refusal led here) goes into the error raised when there is none."""
    found = first_problem(path, lambda _number, line: "bad" if is_bad(line) else None)
    if found is None:
        raise unexplained(path, parser_error)
    number, line, _ = found
    return number, shown(line)


def holds_lines(path: Path, after: int = 0) -> bool:
    """Whether the file has a non-empty line past its first ``after`` lines. pyarrow's CSV reader refuses a
    file without one ("Empty CSV file", "Could not skip initial 1 rows") where it should read no rows."""
    return any(number > after and line for number, line in numbered_lines(path))


def line_blocks(path: Path, block_bytes: int) -> Iterator[bytes]:
    """The file in blocks of about ``block_bytes`` that end at a line break (never splitting a line).

    Reading ourselves bounds memory to about two blocks: pyarrow's streaming CSV reader reads ahead
    without bound, whatever the consumer does.
    """
    with gzip_errors_named(path), open_text(path) as handle:
        first = True
        while block := handle.read(block_bytes):
            if not block.endswith(b"\n"):
                block += handle.readline()  # the rest of the last line: one copy, none when it ends here
            if first:  # a byte-order mark opening the file is not part of its first line
                block, first = block.removeprefix(BOM), False
            if block:
                yield block


def prefetched(parse: Callable[[bytes], T], blocks: Iterator[bytes]) -> Iterator[T]:
    """``parse`` of each block, the next block read and parsed on a second thread while the caller works
    on the current one (file reads and pyarrow's kernels release the GIL): two blocks in flight at most."""

    def read_and_parse() -> T | None:
        block = next(blocks, None)
        return None if block is None else parse(block)

    with ThreadPoolExecutor(1, thread_name_prefix="parse") as pool:
        pending = pool.submit(read_and_parse)
        while (done := pending.result()) is not None:
            pending = pool.submit(read_and_parse)
            yield done


def _text_problem(line: bytes) -> str | None:
    """What makes a line (without its line break) no text line: bytes that are not UTF-8, or a carriage
    return inside it."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not valid UTF-8 (byte {err.start + 1})"
    return "a carriage return inside the line" if b"\r" in line else None


def require_file(path: Path) -> None:
    """Refuse a path that is not a regular file, saying what it is instead."""
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a file")
    if not path.exists():
        raise ValueError(f"missing file: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")


def _find_split_file(directory: Path, split: str, suffixes: tuple[str, ...]) -> Path | None:
    """The one file of ``split``; two candidates (train.txt and train.tsv) are refused, since picking either
    would silently drop the other's facts."""
    found = [directory / f"{split}{suffix}" for suffix in suffixes if (directory / f"{split}{suffix}").exists()]
    if len(found) > 1:
        listed = ", ".join(map(str, found))
        raise ValueError(f"{directory}: more than one file holds the {split} split ({listed}): keep only one")
    if not found:
        return None
    require_file(found[0])
    return found[0]


def find_split_files(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Each split's file in ``directory``: train, valid and test must exist, the negative splits may."""
    files = {}
    for split in ALL_SPLITS:
        path = _find_split_file(directory, split, suffixes)
        if path is not None:
            files[split] = path
        elif split in SPLITS:
            raise ValueError(f"missing file: {directory / (split + '.txt')}")
    return files


class TsvSource:
    """Tab-separated names; every line must have three non-empty fields."""

    kind = "tsv"

    def __init__(self, directory: Path, *, skip_bad_lines: bool = False, block_bytes: int = BLOCK_BYTES):
        self.directory, self.skip_bad_lines, self.block_bytes = Path(directory), skip_bad_lines, block_bytes
        if not self.directory.is_dir():
            raise ValueError(f"{directory}: not a directory")
        self.files = find_split_files(self.directory, (".txt", ".tsv", ".txt.gz", ".tsv.gz"))

    @staticmethod
    def _problem(line: bytes) -> str | None:
        """What is wrong with one line (without its line break), or None."""
        if (problem := _text_problem(line)) is not None:
            return problem
        fields = line.split(b"\t")
        if line and (len(fields) != 3 or not all(fields)):
            return "expected 3 non-empty tab-separated fields (head, relation, tail)"
        return None

    def _failure(self, path: Path, parser_error: str | None = None) -> ValueError:
        """The error naming the file's first bad line (found by scanning it again: only on the way out)."""
        found = first_problem(path, lambda _number, line: self._problem(line))
        if found is None:
            return unexplained(path, parser_error)
        number, line, _ = found
        return self._bad_line(path, number, line)

    def _bad_line(self, path: Path, number: int, line: bytes) -> ValueError:
        problem = self._problem(line) or "malformed line"
        return ValueError(f"{path}:{number}: {problem}: {shown(line)!r} {SKIP_HINT}")

    def _screen(self, path: Path, block: bytes, lines_before: int, skipped: list[int]) -> bytes:
        """``block`` without its bad lines (refused unless skip_bad_lines): lines that are not UTF-8 or hold a
        lone carriage return, which the CSV parser would take for a line break, are caught here."""
        try:
            block.decode("utf-8")
            clean = b"\r" not in block.replace(b"\r\n", b"\n")
        except UnicodeDecodeError:
            clean = False
        if clean:
            return block
        kept = []
        for number, raw in enumerate(block.split(b"\n"), start=lines_before + 1):
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if self._problem(line) is None:
                kept.append(line)
            elif self.skip_bad_lines:
                skipped[0] += 1
            else:
                raise self._bad_line(path, number, line)
        return b"\n".join(kept)

    _COLUMNS = ("head", "relation", "tail")

    def _read_csv(self, block: bytes, block_size: int) -> tuple[pa.Table, int]:
        """The block's rows, and how many rows of the wrong width it skipped (counted per call, so that a
        block parsed twice counts its bad lines once)."""
        invalid = 0

        def on_invalid(row: pcsv.InvalidRow) -> str:
            nonlocal invalid
            if not self.skip_bad_lines:
                return "error"
            invalid += 1
            return "skip"

        columns = list(self._COLUMNS)
        table = pcsv.read_csv(
            pa.BufferReader(block),
            read_options=pcsv.ReadOptions(column_names=columns, block_size=block_size),
            parse_options=pcsv.ParseOptions(
                delimiter="\t", quote_char=False, escape_char=False, invalid_row_handler=on_invalid
            ),
            # Empty fields parse as nulls: the parser counts them, so a clean chunk costs no extra pass.
            convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(columns, pa.string()), strings_can_be_null=True, null_values=[""]
            ),
        )
        return table, invalid

    def _parse_block(self, path: Path, block: bytes) -> tuple[pa.Table, int]:
        """``_read_csv`` in pyarrow's parallel blocks of ``CSV_BLOCK_BYTES``. A refused block longer than one
        of them may only hold a line longer than it ("straddling object"): it is parsed again as one piece.
        A refusal that remains names the first bad line."""
        try:
            return self._read_csv(block, CSV_BLOCK_BYTES)
        except pa.ArrowInvalid as err:
            error = err
        if CSV_BLOCK_BYTES < len(block) < LARGEST_CSV_BLOCK:
            try:
                return self._read_csv(block, len(block) + 1)
            except pa.ArrowInvalid as err:
                error = err
        raise self._failure(path, str(error))

    def chunks(self, split: str, counts: SplitCounts | None = None) -> Iterator[pa.Table]:
        """Tables with string columns head, relation, tail. ``counts`` (when given) gets lines and bad lines."""
        path = self.files[split]
        skipped = [0]
        lines_before = 0
        for raw_block in line_blocks(path, self.block_bytes):
            block = self._screen(path, raw_block, lines_before, skipped)
            lines_before += raw_block.count(b"\n")
            table, invalid = self._parse_block(path, block)
            skipped[0] += invalid
            if any(table[name].null_count for name in self._COLUMNS):
                if not self.skip_bad_lines:
                    raise self._failure(path)
                complete = table.drop_null()
                skipped[0] += table.num_rows - complete.num_rows
                table = complete
            if counts is not None:
                counts.lines += table.num_rows
            yield table
        if counts is not None:
            counts.lines += skipped[0]
            counts.bad_lines += skipped[0]


# N-Triples terms (W3C RDF 1.1 N-Triples), written for RE2. Escapes: UCHAR in IRIs, ECHAR and UCHAR in literals.
_UCHAR = r"\\u[0-9A-Fa-f]{4}|\\U[0-9A-Fa-f]{8}"
_IRI = rf"<(?:[^<>\"{{}}|^`\\\x00-\x20]|{_UCHAR})*>"
_BNODE = r"_:[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_\-])?"
_SUBJECT = rf"(?:{_IRI}|{_BNODE})"
_LITERAL = rf"\"(?:[^\"\\\n\r]|\\[tbnrf\"'\\]|{_UCHAR})*\"(?:@[A-Za-z]+(?:-[A-Za-z0-9]+)*|\^\^{_IRI})?"
_END = r"[ \t]*\.[ \t]*(?:#.*)?$"
NT_TRIPLE = rf"^[ \t]*(?P<head>{_SUBJECT})[ \t]+(?P<relation>{_IRI})[ \t]+(?P<tail>{_SUBJECT}){_END}"
NT_LITERAL = rf"^[ \t]*{_SUBJECT}[ \t]+{_IRI}[ \t]+{_LITERAL}{_END}"
NT_BLANK = r"^[ \t]*(?:#.*)?$"


class NTriplesSource:
    """N-Triples per split (``--valid``/``--test`` optional: a dump has only one file). Entities are
    IRIs (stored without the angle brackets, escapes kept as written) and blank nodes (``_:name``)."""

    kind = "ntriples"

    def __init__(
        self,
        files: dict[str, Path],
        *,
        relations: set[str] | None = None,
        skip_bad_lines: bool = False,
        block_bytes: int = BLOCK_BYTES,
    ):
        self.files = {split: Path(path) for split, path in files.items() if path is not None}
        if "train" not in self.files:
            raise ValueError("N-Triples conversion needs a train file")
        for path in self.files.values():
            require_file(path)
        self.relations = None if relations is None else pa.array(sorted(relations), pa.string())
        self.skip_bad_lines, self.block_bytes = skip_bad_lines, block_bytes

    def chunks(self, split: str, counts: SplitCounts | None = None) -> Iterator[pa.Table]:
        path = self.files.get(split)
        if path is None:
            return
        for table, tally in prefetched(lambda block: self._parse(path, block), line_blocks(path, self.block_bytes)):
            if self.relations is not None:
                keep = pc.is_in(table["relation"], value_set=self.relations)
                tally["filtered"] = table.num_rows - (pc.sum(keep).as_py() or 0)
                table = table.filter(keep)
            if counts is not None:
                for name, value in tally.items():
                    setattr(counts, name, getattr(counts, name) + value)
            yield table

    def _parse(self, path: Path, block: bytes) -> tuple[pa.Table, dict[str, int]]:
        """The triples of a block of whole lines, and its counts (lines, bad_lines, literals).

        Fast path: the compiled scan (``sharding/kernels/ntriples.c``) or, without the kernels, pyarrow's CSV
        reader splits the lines into four terms on the block's delimiter (the first line's: tab, as in
        Freebase's dump, or space), and a term passes when it is a plain IRI
        (``_plain_iri_rows``: one pass over the column's bytes) or, in the object, a literal (a regex over
        those terms alone). Every other line (blank nodes, escapes, comments, runs of blanks, literals
        holding the delimiter, malformed lines) takes the regex path of the whole statement.
        """
        if b"\r" in block and b"\r" in block.replace(b"\r\n", b""):
            # A lone carriage return would end a CSV row but not an N-Triples line: regexes only.
            return self._parse_line_wise(path, block)
        newline = block.find(b"\n")
        delimiter = "\t" if b"\t" in block[: newline if newline >= 0 else len(block)] else " "
        try:
            scanned = native.scan_ntriples(block, delimiter)
        except UnicodeError:  # the line-wise path names the line
            return self._parse_line_wise(path, block)
        if scanned is not None:
            return self._parse_scanned(path, block, scanned)
        other: list[str] = []

        def invalid(row: pcsv.InvalidRow) -> str:
            other.append(row.text)
            return "skip"

        try:
            # Invalid UTF-8 in a row the CSV reader rejects would fail inside its handler, unreported.
            pa.array([block], pa.binary()).cast(pa.string())
            table = pcsv.read_csv(
                pa.BufferReader(block),
                read_options=pcsv.ReadOptions(column_names=_NT_COLUMNS, block_size=1 << 22),
                parse_options=pcsv.ParseOptions(
                    delimiter=delimiter, quote_char=False, escape_char=False, invalid_row_handler=invalid
                ),
                convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(_NT_COLUMNS, pa.string())),
            )
        except pa.ArrowInvalid:  # not UTF-8: the line-wise path names the line
            return self._parse_line_wise(path, block)
        literal = pc.starts_with(table["object"], '"')
        triples, literals = table.filter(pc.invert(literal)), table.filter(literal)
        triples_ok = _well_formed(triples, _plain_iri_rows)
        literals_ok = _well_formed(literals, lambda terms: pc.match_substring_regex(terms, _LITERAL_TERM))
        for part, ok in ((triples, triples_ok), (literals, literals_ok)):
            if ok is not None:
                rest = part.filter(pc.invert(ok))
                other.extend(pc.binary_join_element_wise(*rest.columns, delimiter).to_pylist())
        if triples_ok is not None:
            triples = triples.filter(triples_ok)
        if literals_ok is not None:
            literals = literals.filter(literals_ok)
        parsed = pa.table({name: pc.utf8_slice_codeunits(triples[column], 1, -1) for name, column in _NT_TERMS})
        return self._with_other_lines(path, parsed, literals.num_rows, pa.array(other, pa.string()))

    def _parse_scanned(self, path: Path, block: bytes, scanned: native.NTriplesScan) -> tuple[pa.Table, dict[str, int]]:
        """``_parse`` from the compiled fast path's output: its literals checked with the literal regex, and
        the lines it left (in the order the CSV path leaves them) through the regex path."""
        ok = pc.match_substring_regex(scanned.literals, _LITERAL_TERM).to_numpy(zero_copy_only=False)
        bad = scanned.literal_lines[~ok]
        other = scanned.other
        if len(bad):
            reason = np.full(len(bad), native.NT_LITERAL_LINE)
            other = np.concatenate([other, np.column_stack([bad, reason])])
        other = other[np.lexsort((other[:, 0], other[:, 2]))]
        lines = pa.array([block[start:end].decode() for start, end, _ in other.tolist()], pa.string())
        parsed = pa.table({"head": scanned.heads, "relation": scanned.relations, "tail": scanned.tails})
        return self._with_other_lines(path, parsed, int(ok.sum()), lines)

    def _with_other_lines(
        self, path: Path, parsed: pa.Table, literals: int, other: pa.Array
    ) -> tuple[pa.Table, dict[str, int]]:
        """A fast path's triples and its count of literals, joined by the lines it left (``other``), which
        take the regex path of the whole statement; with the block's counts."""
        tally = {"lines": parsed.num_rows + literals, "bad_lines": 0, "literals": literals}
        if len(other):
            slow, slow_tally = self._parse_lines(path, other)
            parsed = pa.concat_tables([parsed, slow])
            tally = {name: tally[name] + slow_tally[name] for name in tally}
        return parsed, tally

    def _parse_line_wise(self, path: Path, block: bytes) -> tuple[pa.Table, dict[str, int]]:
        """The regex path for every line of a block (a lone carriage return, invalid UTF-8 somewhere)."""
        return self._parse_lines(path, self._split_lines(path, block.removesuffix(b"\n")))

    def _split_lines(self, path: Path, block: bytes) -> pa.Array:
        lines = pc.list_flatten(pc.split_pattern(pa.array([block], pa.binary()), b"\n"))
        try:
            return pc.cast(pc.replace_substring_regex(lines, rb"\r$", b""), pa.string())
        except pa.ArrowInvalid:
            number, text = first_bad_line(path, _not_utf8)
            raise ValueError(f"{path}:{number}: not valid UTF-8: {text!r}") from None

    def _parse_lines(self, path: Path, lines: pa.Array) -> tuple[pa.Table, dict[str, int]]:
        """The regex path: each line matched whole against the N-Triples grammar."""
        parsed = pc.extract_regex(lines, NT_TRIPLE)
        is_triple = pc.is_valid(parsed)
        is_blank = pc.match_substring_regex(lines, NT_BLANK)
        rest = pc.invert(pc.or_(is_triple, is_blank))
        is_literal = pc.and_(rest, pc.match_substring_regex(lines, NT_LITERAL))
        is_bad = pc.and_(rest, pc.invert(is_literal))
        num_bad = pc.sum(is_bad).as_py() or 0
        if num_bad and not self.skip_bad_lines:
            number, text = first_bad_line(path, _nt_bad)
            raise ValueError(
                f"{path}:{number}: not an N-Triples statement (<s> <p> <o> . ; check escapes): {text!r} {SKIP_HINT}"
            )
        triples = pc.filter(parsed, is_triple)
        table = pa.table({name: _unbracket(triples.field(name)) for name in ("head", "relation", "tail")})
        tally = {
            "lines": len(lines) - (pc.sum(is_blank).as_py() or 0),
            "bad_lines": num_bad,
            "literals": pc.sum(is_literal).as_py() or 0,
        }
        return table, tally


_NT_COLUMNS = ["subject", "predicate", "object", "end"]
_NT_TERMS = (("head", "subject"), ("relation", "predicate"), ("tail", "object"))
_LITERAL_TERM = rf"^{_LITERAL}$"
_PLAIN_IRI = r'^<[^<>"{}|^`\\\x00-\x20]*>$'
_IRI_ALLOWED = bytes(sorted(set(range(256)) - set(b'<>"{}|^`\\' + bytes(range(0x21)))))
"""The bytes an IRI without escapes may hold between its brackets (``bytes.translate`` deletes them)."""


def _well_formed(table: pa.Table, object_rows: Callable[[pa.Array], pa.Array | None]) -> pa.Array | None:
    """Which rows (subject, predicate, object, end) hold a plain subject and predicate IRI, an object
    ``object_rows`` accepts (None: all of them), and a lone dot: None when all of them do."""
    if table.num_rows == 0:
        return None
    table = table.combine_chunks()
    terms = (_plain_iri_rows(table["subject"].chunk(0)), _plain_iri_rows(table["predicate"].chunk(0)),
             object_rows(table["object"].chunk(0)))  # fmt: skip
    masks = [mask for mask in terms if mask is not None]
    ok = pc.equal(table["end"], ".")
    if not masks and pc.all(ok).as_py():
        return None
    for mask in masks:
        ok = pc.and_(ok, mask)
    return ok


def _plain_iri_rows(terms: pa.Array) -> pa.Array | None:
    """Which terms are IRIs without escapes, ``<...>`` (None: all of them). In the common case one pass
    over the column's bytes decides: deleting every allowed byte must leave exactly ``<>`` per term, and
    every term starts with ``<`` and ends with ``>``; otherwise a regex decides term by term."""
    if len(terms) and pc.all(pc.starts_with(terms, "<")).as_py() and pc.all(pc.ends_with(terms, ">")).as_py():
        _, offsets, values = terms.buffers()
        first, last = np.frombuffer(offsets, np.int32)[[terms.offset, terms.offset + len(terms)]]
        data = memoryview(values)[first:last]
        if bytes(data).translate(None, _IRI_ALLOWED) == b"<>" * len(terms):
            return None
    return pc.match_substring_regex(terms, _PLAIN_IRI)


def _unbracket(terms: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(terms, r"^<(.*)>$", r"\1")


def _not_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


_NT_OK = [re.compile(p.encode()) for p in (NT_TRIPLE, NT_LITERAL, NT_BLANK)]


def _nt_bad(line: bytes) -> bool:
    return not any(p.search(line) for p in _NT_OK)


@dataclass
class IdVocabulary:
    """Names in id order, read from a DGL-KE ``*2id.txt`` file."""

    names: pa.Array

    @classmethod
    def read(cls, path: Path) -> IdVocabulary:
        require_file(path)
        with open(path, "rb") as handle:
            header = handle.readline().removeprefix(BOM).strip()  # a BOM, as the other files may open with
        if not header.isdigit():
            raise ValueError(f"{path}:1: expected the number of entries, got {header[:80]!r}")
        table = _read_tsv_columns(path, ["name", "id"], [pa.string(), pa.int64()], skip_rows=1)
        count = int(header)
        if table.num_rows != count:
            raise ValueError(f"{path}: first line says {count} entries, the file has {table.num_rows}")
        ids = table["id"].to_numpy()
        if not np.array_equal(np.sort(ids), np.arange(count)):
            raise ValueError(f"{path}: ids are not exactly 0..{count - 1}")
        order = np.argsort(ids)
        names = pc.take(table["name"], pa.array(order)).combine_chunks()
        _refuse_empty_names(path, names)
        _refuse_repeated_names(path, names)
        return cls(names=names)


def _entry_name(number: int, line: bytes) -> bytes | None:
    """The name field of an entry line of a ``*2id.txt`` file (None: the count line, an empty line)."""
    return line.split(b"\t")[0] if number > 1 and line else None


def _refuse_empty_names(path: Path, names: pa.Array) -> None:
    """An empty name would be stored as a real entity or relation that no one can name."""
    if not pc.any(pc.equal(pc.binary_length(names), 0)).as_py():
        return
    found = first_problem(path, lambda number, line: "empty name" if _entry_name(number, line) == b"" else None)
    if found is None:  # unreachable: the table's empty name is a line of the file
        raise ValueError(f"{path}: a name is empty")
    number, line, _ = found
    raise ValueError(f"{path}:{number}: empty name: {shown(line)!r}")


def _refuse_repeated_names(path: Path, names: pa.Array) -> None:
    """A name with two ids makes the map from names to ids ambiguous (either id could be the entity)."""
    distinct = native.distinct_strings(names)  # the compiled hash table, else pyarrow's
    if len(distinct if distinct is not None else pc.unique(names)) == len(names):
        return
    counts = pc.value_counts(names)  # on the way to the error only: find which names repeat
    repeated = set(counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist())
    first_line: dict[str, int] = {}

    def seen_before(number: int, line: bytes) -> str | None:
        field = _entry_name(number, line)
        name = None if field is None else field.decode("utf-8", errors="replace")
        if name is None or name not in repeated:
            return None
        if name in first_line:
            return f"name {name!r} has an id on line {first_line[name]} already"
        first_line[name] = number
        return None

    found = first_problem(path, seen_before)
    if found is None:  # unreachable: the table's names are the file's
        raise ValueError(f"{path}: names occur more than once: {sorted(repeated)[:5]}")
    number, line, problem = found
    raise ValueError(f"{path}:{number}: {problem}: {shown(line)!r}")


def _read_tsv_columns(path: Path, names: list[str], types: list[pa.DataType], skip_rows: int = 0) -> pa.Table:
    if not holds_lines(path, after=skip_rows):  # pyarrow refuses such a file instead of reading no rows
        return pa.table({name: pa.array([], kind) for name, kind in zip(names, types, strict=True)})
    try:
        return pcsv.read_csv(
            str(path),
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=skip_rows),
            parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False),
            convert_options=_no_nulls(names, types),
        )
    except pa.ArrowInvalid as err:
        raise _columns_error(path, names, types, skip_rows, f"{len(names)} tab-separated fields {names}", err) from None


def _no_nulls(names: list[str], types: list[pa.DataType]) -> pcsv.ConvertOptions:
    """Columns of ``types`` in which no value reads as null: by default pyarrow reads an empty field, ``NULL``,
    ``NA``, ``NaN`` and the like as null, which an int64 id column turns into a garbage number."""
    return pcsv.ConvertOptions(
        column_types=dict(zip(names, types, strict=True)), null_values=[], strings_can_be_null=False
    )


def _columns_error(
    path: Path, names: list[str], types: list[pa.DataType], skip_rows: int, expected: str, err: pa.ArrowInvalid
) -> ValueError:
    """The error naming the first line pyarrow's CSV reader (as ``_no_nulls`` sets it) refuses, and why."""

    def problem(number: int, line: bytes) -> str | None:
        return None if number <= skip_rows else _fields_problem(line, names, types)

    found = first_problem(path, problem)
    if found is None:
        return unexplained(path, str(err))
    number, line, reason = found
    return ValueError(f"{path}:{number}: expected {expected}; {reason}: {shown(line)!r}")


INT64_DIGITS = 19
"""Digits of the largest 64-bit integer, 9223372036854775807."""
_DECIMAL = re.compile(rb"-?[0-9]+")
_HEX = re.compile(rb"0[xX][0-9A-Fa-f]{1,16}")
"""pyarrow's int64 conversion also reads hexadecimal: accepted here alike, so the checker never blames a line
the reader took."""


def _fields_problem(line: bytes, names: list[str], types: list[pa.DataType]) -> str | None:
    """What pyarrow's CSV reader (tab-separated, ``_no_nulls``) refuses in one line, or None: the checker
    that names the line after the reader refused a block."""
    line = line.rstrip(b"\r")  # the reader takes a carriage return for a line break
    if not line:
        return None  # the reader skips empty lines
    if (problem := _text_problem(line)) is not None:
        return problem
    fields = line.split(b"\t")
    if len(fields) != len(names):
        return f"found {len(fields)} field(s)"
    for name, field, kind in zip(names, fields, types, strict=True):
        if kind == pa.int64() and (problem := _int64_problem(field)) is not None:
            return f"{name} {problem}"
    return None


def _int64_problem(field: bytes) -> str | None:
    """Why pyarrow's int64 conversion refuses ``field`` (with null values off), or None."""
    digits = field.strip(b" ")  # the reader trims spaces around numbers
    if not digits:
        return "is empty"
    if _HEX.fullmatch(digits):
        return None
    if not _DECIMAL.fullmatch(digits):
        return "is not an integer"
    significant = digits.lstrip(b"-").lstrip(b"0")
    if len(significant) > INT64_DIGITS or not -(2**63) <= int(digits) < 2**63:  # int() of a few digits only
        return "is outside the 64-bit integer range"
    return None


class DglKeSource:
    """DGL-KE's Freebase86m layout: integer triples (head, tail, relation) and two id maps."""

    kind = "dglke"

    def __init__(self, directory: Path, *, block_bytes: int = BLOCK_BYTES):
        self.directory, self.block_bytes = Path(directory), block_bytes
        if not self.directory.is_dir():
            raise ValueError(f"{directory}: not a directory")
        self.files = find_split_files(self.directory, (".txt", ".tsv"))

    def vocabularies(self) -> tuple[IdVocabulary, IdVocabulary]:
        return (
            IdVocabulary.read(self.directory / "entity2id.txt"),
            IdVocabulary.read(self.directory / "relation2id.txt"),
        )

    def chunks(self, split: str, counts: SplitCounts | None = None) -> Iterator[pa.Table]:
        """Tables with int64 columns head, relation, tail (reordered from the file's head, tail, relation)."""
        path = self.files[split]
        names, types = ["head", "tail", "relation"], [pa.int64()] * 3
        if not holds_lines(path):  # no rows: the converter then says the split is empty
            return
        try:
            reader = pcsv.open_csv(
                str(path),
                read_options=pcsv.ReadOptions(column_names=names, block_size=self.block_bytes),
                parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False),
                convert_options=_no_nulls(names, types),
            )
            for batch in reader:
                if counts is not None:
                    counts.lines += batch.num_rows
                yield pa.Table.from_batches([batch]).select(["head", "relation", "tail"])
        except pa.ArrowInvalid as err:
            expected = "3 tab-separated integers (head, tail, relation)"
            raise _columns_error(path, names, types, 0, expected, err) from None
