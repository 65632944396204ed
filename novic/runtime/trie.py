"""Token trie over noun token sequences, for guided decoding (torch-free).

Nodes are ints (root 0). Children of every node are stored once, sorted by token id, in flat
arrays indexed by per-node offsets (CSR), so a lookup costs O(children of that node) and never
depends on how many nouns the trie holds. EOS (id 0) is not an edge: a node where a noun ends is
"terminal", and there EOS is allowed.

For guided decoding every node's candidate row (EOS first where a noun ends, then the children
in token order) is also stored once, flat (`cand_offsets`, `cand_tokens`, `cand_next`), so the
candidates of many nodes are a few vectorised gathers (`candidate_rows`, `candidates`).
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
        depth = [0]  # tokens from the root
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
                    depth.append(depth[node] + 1)
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

        # Candidate rows of all nodes, flat: EOS first where a noun ends (its next node is the
        # node itself), then the children in token order.
        term = self._terminal.astype(np.int64)
        cand_counts = counts + term
        self.cand_offsets = np.zeros(len(edges) + 1, dtype=np.int64)
        np.cumsum(cand_counts, out=self.cand_offsets[1:])
        total = int(self.cand_offsets[-1])
        at = np.arange(total, dtype=np.int64)
        owner = np.repeat(np.arange(len(edges), dtype=np.int64), cand_counts)
        edge = at - self.cand_offsets[owner] - term[owner] + self._offsets[owner]
        is_eos = (at == self.cand_offsets[owner]) & self._terminal[owner]
        edge = np.where(is_eos, 0, edge)
        self.cand_tokens = np.where(is_eos, EOS, self._tokens[edge])
        self.cand_next = np.where(is_eos, owner, self._nodes[edge])
        # The same rows per node with one extra, last entry for node -1 (a finished beam: no
        # candidates, padding token 0), so that `row_start[nodes]` needs no mask for -1 nodes.
        # Every node's row is non-empty (a node either has children or ends a noun), so
        # `row_token` is its first candidate: the only one where the row is 1 wide.
        first = self.cand_offsets[:-1]
        self.row_start = np.append(first, 0)
        self.row_count = np.append(cand_counts, 0)
        self.row_token = np.append(self.cand_tokens[first], 0)
        for a in (self.cand_offsets, self.cand_tokens, self.cand_next, self.row_start,
                  self.row_count, self.row_token):
            a.setflags(write=False)
        # The root's row (never EOS: no noun is empty), which every search starts from.
        self.root_tokens = self.cand_tokens[:cand_counts[0]]
        self.root_next = self.cand_next[:cand_counts[0]]
        # Widest candidate row of candidates(): children plus EOS where a noun ends.
        self.max_candidates = int(cand_counts.max())
        # Widest row among the nodes at each depth: every live beam at step t sits at depth t, so
        # guided search pads step t to depth_candidates[t]: the same shape for every batch (CUDA
        # graphs replay), and far narrower than the widest row after the first few tokens.
        self.depth_candidates = np.zeros(max(depth) + 1, dtype=np.int64)
        np.maximum.at(self.depth_candidates, np.asarray(depth, dtype=np.int64), cand_counts)
        self.depth_candidates.setflags(write=False)

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

    def candidate_rows(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (start [N], count [N]): row n's candidates are cand_tokens/cand_next[start:start +
        count] (EOS first where the node is terminal, then the children by token id); node -1
        (no candidates) has count 0. No range check: for nodes this trie handed out."""
        nodes = np.asarray(nodes, dtype=np.int64).reshape(-1)
        return self.row_start[nodes], self.row_count[nodes]

    def candidates(self, nodes: np.ndarray, width: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Allowed next tokens of many nodes at once (-1 = a row with no candidates).

        -> (token_ids [N,G], next_nodes [N,G], valid [N,G]) with G = `width`, or by default
        max(1, widest row). Each row lists EOS first where the node is terminal (its next node
        is the node itself), then the children in ascending token order; padding is token 0,
        node -1, valid False. Cost O(N * G), independent of the number of sequences.
        """
        nodes = np.asarray(nodes, dtype=np.int64).reshape(-1)
        if nodes.size and (nodes.max() >= self.num_nodes or nodes.min() < -1):
            raise IndexError("trie node out of range")
        start, count = self.candidate_rows(nodes)
        widest = int(count.max(initial=0))
        G = max(1, widest) if width is None else int(width)
        if G < widest:
            raise ValueError(f"width {G} is narrower than the widest candidate row ({widest})")
        j = np.arange(G)
        valid = j < count[:, None]
        at = np.where(valid, start[:, None] + j, 0)
        token_ids = np.where(valid, self.cand_tokens[at], EOS)
        next_nodes = np.where(valid, self.cand_next[at], -1)
        return token_ids, next_nodes, valid
