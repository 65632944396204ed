"""Token trie over noun token sequences, for guided decoding (torch-free).

Nodes are ints (root 0). Children of every node are stored once, sorted by token id, in flat
arrays indexed by per-node offsets (CSR), so a lookup costs O(children of that node) and never
depends on how many nouns the trie holds. EOS (id 0) is not an edge: a node where a noun ends is
"terminal", and there EOS is allowed.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from novic.config import EOS


class TokenTrie:
    def __init__(self, sequences: Iterable[Sequence[int]]):
        # Build with one dict per node (O(total tokens)), then freeze into sorted flat arrays.
        edges: list[dict[int, int]] = [{}]
        terminal = [False]
        count = max_len = max_token = 0
        for i, seq in enumerate(sequences):
            node = 0
            for tok in seq:
                tok = int(tok)
                if tok <= EOS:
                    raise ValueError(f"sequence {i} contains token id {tok}: ids must be >= 1 "
                                     f"(0 is EOS and ends a sequence implicitly)")
                nxt = edges[node].get(tok)
                if nxt is None:
                    nxt = edges[node][tok] = len(edges)
                    edges.append({})
                    terminal.append(False)
                node = nxt
                max_token = max(max_token, tok)
            if node == 0:
                raise ValueError(f"sequence {i} is empty: every noun needs at least one token")
            terminal[node] = True
            max_len = max(max_len, len(seq))
            count += 1
        if count == 0:
            raise ValueError("TokenTrie needs at least one sequence")

        counts = np.fromiter((len(e) for e in edges), dtype=np.int64, count=len(edges))
        self._offsets = np.zeros(len(edges) + 1, dtype=np.int64)
        np.cumsum(counts, out=self._offsets[1:])
        self._tokens = np.empty(int(self._offsets[-1]), dtype=np.int64)
        self._nodes = np.empty(int(self._offsets[-1]), dtype=np.int64)
        for node, e in enumerate(edges):
            lo = self._offsets[node]
            for j, tok in enumerate(sorted(e)):
                self._tokens[lo + j] = tok
                self._nodes[lo + j] = e[tok]
        self._terminal = np.array(terminal, dtype=bool)
        for a in (self._offsets, self._tokens, self._nodes, self._terminal):
            a.setflags(write=False)  # children() hands out views

        self.num_nodes = len(edges)
        self.num_sequences = int(self._terminal.sum())  # distinct sequences
        self.max_len = max_len                          # longest sequence (tokens, no EOS)
        self.max_token = max_token
        self.max_children = int(counts.max())
        # Widest candidate row of candidates(): children plus EOS where a noun ends.
        self.max_candidates = int((counts + self._terminal).max())

    def _check(self, node: int) -> int:
        node = int(node)
        if not 0 <= node < self.num_nodes:
            raise IndexError(f"trie node {node} out of range [0, {self.num_nodes})")
        return node

    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (token ids ascending, child node ids), read-only int64 views."""
        node = self._check(node)
        lo, hi = self._offsets[node], self._offsets[node + 1]
        return self._tokens[lo:hi], self._nodes[lo:hi]

    def is_terminal(self, node: int) -> bool:
        """True where a sequence ends, i.e. EOS may follow."""
        return bool(self._terminal[self._check(node)])

    def advance(self, node: int, token: int) -> int:
        """Child of `node` along `token`, or -1 if no sequence continues that way."""
        toks, nodes = self.children(node)
        i = int(np.searchsorted(toks, token))
        return int(nodes[i]) if i < len(toks) and toks[i] == token else -1

    def __contains__(self, seq: Sequence[int]) -> bool:
        node = 0
        for tok in seq:
            node = self.advance(node, tok)
            if node < 0:
                return False
        return node != 0 and self.is_terminal(node)

    def candidates(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Allowed next tokens of many nodes at once (-1 = a row with no candidates).

        -> (token_ids [N,G], next_nodes [N,G], valid [N,G]) with G = max(1, widest row).
        Each row lists EOS first where the node is terminal (its next node is the node itself),
        then the children in ascending token order; padding is token 0, node -1, valid False.
        Cost O(N * G), independent of the number of sequences.
        """
        nodes = np.asarray(nodes, dtype=np.int64).reshape(-1)
        if nodes.size and (nodes.max() >= self.num_nodes or nodes.min() < -1):
            raise IndexError("trie node out of range")
        live = nodes >= 0
        safe = np.where(live, nodes, 0)
        term = self._terminal[safe] & live
        lo = self._offsets[safe]
        nkids = np.where(live, self._offsets[safe + 1] - lo, 0)
        counts = nkids + term
        G = max(1, int(counts.max(initial=0)))

        j = np.arange(G)[None, :]
        valid = j < counts[:, None]
        is_eos = (j == 0) & term[:, None]
        kid = valid & ~is_eos
        edge = np.where(kid, lo[:, None] + j - term[:, None], 0)
        token_ids = np.where(kid, self._tokens[edge], EOS)  # the trie has >= 1 edge
        next_nodes = np.where(kid, self._nodes[edge], np.where(is_eos, nodes[:, None], -1))
        return token_ids, next_nodes, valid
