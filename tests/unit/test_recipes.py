"""README `### Recipes for real corpora`: every `terrabyte shards` command of each recipe, as written
there, runs through the real CLI on a small stand-in built here (a source tree and its tarball, a
MediaWiki dump, a folder of books) and yields verified shards with a train and a val split, the
planted near-copies dropped; each `terrabyte pretrain` line loads as a config."""
import io
import random
import re
import shlex
import tarfile
from pathlib import Path

import pytest

from terrabyte.data_pipeline import cli
from terrabyte.data_pipeline.read.loader import split_documents
from terrabyte.data_pipeline.read.manifest import load_manifest
from terrabyte.data_pipeline.verify import verify_shards

README = Path(__file__).resolve().parents[2] / "README.md"
WORDS = ("the of and to in is was for on that with as by at from his her it an be this which or had are not but "
         "were have one all their they there been has when who will more no if out so said what up its about "
         "into than them can only other new some could time these two may then do first any my now such like").split()


def recipe_commands() -> dict:
    """{recipe heading: [command lines]} from the README section, continuation lines joined."""
    text = README.read_text()
    section = text.split("### Recipes for real corpora", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    out = {}
    for m in re.finditer(r"\*\*(\w+)[^*]*\*\*.*?```bash\n(.*?)```", section, re.S):
        lines = m.group(2).replace("\\\n", " ").splitlines()
        out[m.group(1)] = [" ".join(l.split()) for l in lines if l.strip() and not l.lstrip().startswith("#")]
    return out


def prose(rng: random.Random, nbytes: int, topic: str) -> str:
    lines, size = [], 0
    while size < nbytes:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + f" {topic}."
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


def code_tree(root: Path, rng: random.Random):
    """A cpython-like tree: 60 folders of two modules each, a vendored near-copy, a binary file."""
    for i in range(60):
        pkg = root / ("Lib" if i % 3 else "Modules") / f"pkg{i:02d}"
        pkg.mkdir(parents=True)
        body = "".join(f"def f{i}_{k}(x):\n    return x * {rng.randint(0, 10**6)} + {k}  # {prose(rng, 40, 'x').strip()}\n"
                       for k in range(30))
        (pkg / "core.py").write_text(body)
        (pkg / "helpers.c").write_text("".join(f"int helper_{i}_{k}(int x) {{ return x + {rng.randint(0, 10**9)}; }}"
                                                f"  /* {prose(rng, 60, 'c')} */\n" for k in range(8)))
    vendored = (root / "Lib" / "pkg01" / "core.py").read_text().replace("return x", "return  x", 2)
    (root / "Tools" / "vendor").mkdir(parents=True)
    (root / "Tools" / "vendor" / "core_copy.py").write_text(vendored)
    (root / "Lib" / "pkg01" / "core.o").write_bytes(bytes(range(256)) * 4)


def mediawiki(path: Path, rng: random.Random):
    pages = []
    for i in range(400):
        pages.append((f"Article {i}", prose(rng, rng.randint(300, 1500), f"article{i}")))
    pages.append(("Redirect", "#REDIRECT [[Article 1]]"))
    pages.append(("Article 7 (copy)", pages[7][1].replace("article7.", "article7!", 1)))
    from xml.sax.saxutils import escape

    xml = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">',
           "<siteinfo><sitename>Stand-in</sitename></siteinfo>"]
    for k, (title, text) in enumerate(pages):
        xml.append(f"<page><title>{escape(title)}</title><ns>0</ns><id>{k + 1}</id><revision><id>{k + 1}</id>"
                   f'<text xml:space="preserve">{escape(text)}</text></revision></page>')
    xml.append("</mediawiki>\n")
    import bz2

    path.write_bytes(bz2.compress("\n".join(xml).encode()))


def books(root: Path, rng: random.Random):
    root.mkdir()
    for i in range(60):
        (root / f"{i:03d}-0.txt").write_text(f"Book {i}\n\n" + prose(rng, rng.randint(3000, 9000), f"book{i}"))
    # another edition of book 5: CRLF line endings; and one book larger than a member (streamed)
    (root / "005-crlf.txt").write_bytes((root / "005-0.txt").read_bytes().replace(b"\n", b"\r\n"))
    (root / "999-long.txt").write_text(prose(rng, 3 << 20, "long"))
    (root / "README.md").write_text("not a book")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    base = tmp_path_factory.mktemp("recipes")
    rng = random.Random(0)
    code_tree(base / "cpython", rng)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(base / "cpython", arcname="Python-3.12.4")
    (base / "Python-3.12.4.tgz").write_bytes(buf.getvalue())
    mediawiki(base / "simplewiki-latest-pages-articles.xml.bz2", rng)
    books(base / "books", rng)
    return base


def _run_recipe(name, stand_ins, monkeypatch):
    monkeypatch.chdir(stand_ins)
    commands = recipe_commands()[name]
    built, configs = [], []
    for line in commands:
        args = shlex.split(line.replace("~/src/", "~/"))
        args = [str(stand_ins) + a[1:] if a.startswith("~/") else a for a in args]
        if args[:2] == ["terrabyte", "shards"]:
            if args[2] == "build":
                args = [a if not (i and args[i - 1] == "--workers") else "1" for i, a in enumerate(args)]
                args.append("--no-progress")
            if args[2] == "verify":
                args.append("--no-progress")
            assert cli.main(args[1:]) == 0, line
            if args[2] == "build":
                out = args[args.index("--out") + 1]
                assert verify_shards(out) == []  # every build, not only the last one into the same folder
                man = load_manifest(out)
                man["_paths"] = {split: [p for p, _ in split_documents(out, split)] for split in ("train", "val")}
                built.append(man)
        elif args[:2] == ["terrabyte", "pretrain"]:
            configs.append(args[2:])
    assert built, f"recipe {name}: no build command found in the README"
    from terrabyte.pretrain.train.config import load_config

    for argv in configs:
        cfg = load_config(argv[1], argv[2:])
        assert cfg.data.path.startswith("runs/")
    return built


def test_code_recipe_tree_and_tarball(stand_ins, monkeypatch):
    tree, tarball = _run_recipe("Code", stand_ins, monkeypatch)
    for man in (tree, tarball):
        t = man["totals"]
        assert t["train"]["documents"] > 0 and t["val"]["documents"] > 0
        assert t["all"]["documents"] == 120  # 60 .py + 60 .c, the binary left out, the vendored copy dropped
        assert man["dedup"]["near"] == 1
    assert tree["dedup"]["dropped_docs"][0]["path"] == "Tools/vendor/core_copy.py"
    assert tarball["dedup"]["dropped_docs"][0]["kept"] == "Python-3.12.4.tgz/Python-3.12.4/Lib/pkg01/core.py"
    # both split by package folder: the tree's `Lib/pkgNN`, the tarball's `<tgz>/Python-3.12.4/Lib/pkgNN`
    for man, skip in ((tree, 0), (tarball, 2)):
        folders = {s: {"/".join(p.split("/")[skip:skip + 2]) for p in man["_paths"][s]} for s in ("train", "val")}
        assert folders["val"] and not folders["train"] & folders["val"]
        assert all(len(p.split("/")) == skip + 3 for s in ("train", "val") for p in man["_paths"][s])


def test_wiki_recipe(stand_ins, monkeypatch):
    (man,) = _run_recipe("Wikipedia", stand_ins, monkeypatch)
    t = man["totals"]
    assert t["all"]["documents"] == 400 and t["val"]["documents"] > 0
    assert man["stats"]["filtered_size"] == 1  # the redirect
    assert [d["path"] for d in man["dedup"]["dropped_docs"]] == \
        ["simplewiki-latest-pages-articles.xml.bz2/Article 7 (copy)"]


def test_books_recipe(stand_ins, monkeypatch):
    (man,) = _run_recipe("Books", stand_ins, monkeypatch)
    t = man["totals"]
    assert t["all"]["documents"] == 61 and t["val"]["documents"] > 0
    assert [(d["path"], d["kept"]) for d in man["dedup"]["dropped_docs"]] == [("005-crlf.txt", "005-0.txt")]
    assert any(s["spans"] for s in man["shards"])  # the long book was streamed into several members
