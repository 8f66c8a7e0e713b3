"""The engine's exchange of states (pure): from the state messages of every member of a new
regular configuration, what each member knows afterwards and what it must retransmit.

A state message (JSON, one per member, multicast on entering ExchangeStates):

    g     its green line (the number of actions it has green)
    gb    the green ordinal below which it has no action bodies (white actions it
          discarded, or a joiner's snapshot point): it cannot retransmit ordinals <= gb
    cut   {creator: n}: the red cut, it holds creator's actions 1..n (green, yellow or red)
    prim  [index, attempt, members]: the last primary component it installed or learned of
    att   the highest attempt index it used on top of that primary
    vul   [index, attempt, members] of the primary it tried to install and whose outcome it
          does not know (vulnerable: sent its CPC, saw no decision), or null
    y     [[creator, index], ...]: its yellow actions, in order
    amn   amnesic: restarted after a crash inside its last primary (see below)

`plan()` is computed identically at every member (same messages, same order), so every
decision below is common knowledge of the configuration without another round:

- **Last primary**: the highest (index, attempt) reported; every member adopts it (the
  eventual path of section 3.1: knowledge spreads in non-primary components too).
- **Green**: ordinals (min g, max g] are retransmitted, each by the lowest-id member that
  has its body; a member marks them green at those ordinals. An ordinal that nobody
  present can send leaves the configuration unable to construct (`servable` False).
- **Red**: per creator c, the member with the highest cut (lowest id on ties) retransmits
  the actions of c above the lowest cut that it does not hold green (the green ones go in
  the green retransmission). Cuts are contiguous, so afterwards every member holds the
  same set of actions.
- **Yellow**: among the members whose last primary is the adopted one, the yellow list of
  the one whose green line + yellow list is longest (lowest id on ties): all those lists
  are prefixes of one sequence (the total order of that primary's configuration), so the
  longest one covers the others. Every member adopts it (less what became green); any
  other yellow action becomes red.
- **Vulnerability** (the ? transition of Figure 4) of an attempt V = (index, attempt, set)
  is resolved when (a) some member's last primary has index >= V's (V was installed, or
  its fate was settled before a later primary could form: a later primary needs a member
  of V, and a vulnerable member never joins an attempt), or (b) a member of V's set whose
  last primary is V's base is not vulnerable for V (it never sent its CPC, or it saw the
  configuration change before all CPCs (case 3), or it resolved V as not installed: in
  each case nobody installed V), or (c) every member of V's set is present and vulnerable
  for V (nobody installed it). Otherwise the configuration may not try to construct.
- **Amnesia** (`amn`): a server that restarted after a crash inside a primary P (it
  had installed P and not finished an exchange since) may have missed green actions of P:
  Safe delivery promises them to every member of P's configuration *unless it crashes*,
  so they may be green at other members (and unforced log records may have been lost
  with the process). Dynamic linear voting relies on every quorum holding what P ordered,
  so an amnesic member blocks a construct until (a) some member's last primary is later
  than P, or (b) another member of P whose last primary is P and which is not amnesic is
  present (it delivered all of P's actions, green or yellow), or (c) every member of P is
  present. Once such an exchange ends, the member has caught up and is no longer
  amnesic. (Not in the paper's text, which leaves recovery to [2]; without it a recovered
  member could form the next primary alone, e.g. as the lowest id of a two-member P,
  without P's last green actions: the simulator finds such runs.)
- **Attempt**: 1 + the highest attempt index used on top of the adopted primary.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def prim_key(prim) -> tuple:
    return (prim[0], prim[1])


def norm_state(obj: dict) -> dict:
    """A decoded state message with integer keys and tuples."""
    return {
        "g": int(obj["g"]), "gb": int(obj["gb"]),
        "cut": {int(c): int(n) for c, n in obj["cut"].items()},
        "prim": (int(obj["prim"][0]), int(obj["prim"][1]), tuple(obj["prim"][2])),
        "att": int(obj["att"]), "amn": bool(obj["amn"]),
        "vul": (None if obj["vul"] is None else
                (int(obj["vul"][0]), int(obj["vul"][1]), tuple(obj["vul"][2]))),
        "y": [tuple(x) for x in obj["y"]],
    }


@dataclass
class Plan:
    prim: tuple
    green_min: int
    green_max: int
    servable: bool
    green_to_send: list = field(default_factory=list)     # my ordinals to retransmit
    red_to_send: list = field(default_factory=list)       # my (creator, lo, hi) ranges
    yellow: list = field(default_factory=list)            # adopted yellow aids, in order
    unresolved: list = field(default_factory=list)        # members still vulnerable
    amnesic: list = field(default_factory=list)           # members still amnesic
    attempt: int = 0


def vulnerability_resolved(vul: tuple, states: dict) -> bool:
    index, _attempt, vset = vul
    if any(s["prim"][0] >= index for s in states.values()):
        return True
    for x in vset:
        s = states.get(x)
        if s is not None and s["prim"][0] == index - 1 and s["vul"] != vul:
            return True
    return all(x in states and states[x]["vul"] == vul for x in vset)


def amnesia_resolved(m: int, states: dict) -> bool:
    prim = states[m]["prim"]
    if any(prim_key(s["prim"]) > prim_key(prim) for s in states.values()):
        return True
    if any(x != m and x in states and states[x]["prim"] == prim and not states[x]["amn"]
           for x in prim[2]):
        return True
    return all(x in states for x in prim[2])


def plan(me: int, states: dict) -> Plan:
    """What `me` knows and sends after the state messages `states` {member: state}."""
    members = sorted(states)
    prim = max((s["prim"] for s in states.values()), key=prim_key)
    gs = [states[m]["g"] for m in members]
    p = Plan(prim=prim, green_min=min(gs), green_max=max(gs), servable=True)
    for o in range(p.green_min + 1, p.green_max + 1):
        sender = next((m for m in members if states[m]["gb"] < o <= states[m]["g"]), None)
        if sender is None:
            p.servable = False
        elif sender == me:
            p.green_to_send.append(o)
    creators = set()
    for s in states.values():
        creators.update(s["cut"])
    for c in sorted(creators):
        cuts = [(states[m]["cut"].get(c, 0), m) for m in members]
        lo = min(n for n, _ in cuts)
        hi = max(n for n, _ in cuts)
        if hi > lo:
            sender = min(m for n, m in cuts if n == hi)
            if sender == me:
                p.red_to_send.append((c, lo, hi))
    updated = [m for m in members if prim_key(states[m]["prim"]) == prim_key(prim)]
    best = max(updated, key=lambda m: (states[m]["g"] + len(states[m]["y"]), -m))
    p.yellow = list(states[best]["y"])
    p.unresolved = [m for m in members if states[m]["vul"] is not None
                    and not vulnerability_resolved(states[m]["vul"], states)]
    p.amnesic = [m for m in members if states[m]["amn"] and not amnesia_resolved(m, states)]
    p.attempt = 1 + max(states[m]["att"] for m in updated)
    return p


def quorum(members, prim: tuple, servers, weights: dict) -> bool:
    """Dynamic linear voting: members hold a weighted majority of the last primary's
    members that are still servers; exactly half wins iff it holds the lowest such id."""
    voters = [v for v in prim[2] if v in servers]
    if not voters:
        return False
    total = sum(weights.get(v, 1) for v in voters)
    have = sum(weights.get(v, 1) for v in voters if v in members)
    return 2 * have > total or (2 * have == total and min(voters) in members)
