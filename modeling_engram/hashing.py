"""EngramHasher: n-gram hash ids for every Engram layer, computed once per forward at model entry."""

import torch
from torch import nn

from .configuration_engram import EngramConfig, multiplier_limit
from .kernel_dispatch import load_kernels, use_triton

DEAD = -1  # compressed id of a dead token (engram_dead_token_ids), in the hashed sequence and the cache's history


class EngramHasher(nn.Module):
    """Maps raw token ids to per-head row ids of every Engram layer's tables.

    For compressed ids x' (token map), order n and layer l: mix_n = XOR_{k<n} x'_{t-k} * m_{l,k} in int64 and
    head j of order n reads row `mix_n % p_{l,n,j}`. All products are non-negative and below 2**63 (the config
    bounds the multipliers by int64_max // V'), so torch's floor `%` equals the demo's numpy `%` bit for bit.

    Dead tokens (`engram_dead_token_ids`, DeepSeek-V4.1's image placeholders) compress to `DEAD`; an n-gram never
    reaches across one: in the window of position t, x'_{t-k} reads the pad id when any of x_{t-k} .. x_t is dead
    (so a dead token and everything before it read as the start of a sequence). The history kept in the
    generation cache holds `DEAD` too, so cached decoding cuts the n-grams where a full forward does.

    Buffers: `token_map` [vocab_size] (persistent: part of the checkpoint), `multiplier_tensor` [L, N],
    `table_size_tensor` [L, (N-1) * H] and `dead_tokens` [vocab_size] uint8 (rebuilt from the config, which stores
    them as JSON). The same constants as Python ints: `multipliers` and `table_sizes`, `{layer_id: [int, ...]}`.
    """

    def __init__(self, config: EngramConfig, token_map: torch.Tensor | None = None):
        super().__init__()
        self.layer_ids = list(config.engram_layer_ids)
        self.max_ngram_size = config.max_ngram_size
        self.n_head_per_ngram = config.n_head_per_ngram
        self.vocab_size = config.vocab_size
        self.compressed_vocab_size = config.engram_compressed_vocab_size
        self.pad_id = config.engram_pad_id
        self.kernel = config.engram_kernel
        self.multipliers = {layer_id: list(m) for layer_id, m in zip(self.layer_ids, config.engram_multipliers)}
        self.table_sizes = {layer_id: list(s) for layer_id, s in zip(self.layer_ids, config.engram_table_sizes)}
        self.token_map = nn.Buffer(self.default_token_map())
        self.token_map_checked = False
        self.multiplier_tensor = nn.Buffer(torch.tensor(config.engram_multipliers, dtype=torch.long), persistent=False)
        self.table_size_tensor = nn.Buffer(torch.tensor(config.engram_table_sizes, dtype=torch.long), persistent=False)
        self.dead_token_ids = list(config.engram_dead_token_ids)
        self.dead_tokens = nn.Buffer(self.default_dead_tokens(), persistent=False)
        if token_map is not None:
            self.set_token_map(token_map)

    def default_token_map(self) -> torch.Tensor:
        """Identity when there is no compression; otherwise -1 ("unset") until `set_token_map` is called."""
        if self.compressed_vocab_size == self.vocab_size:
            return torch.arange(self.vocab_size, dtype=torch.long)
        return torch.full((self.vocab_size,), -1, dtype=torch.long)

    def default_dead_tokens(self) -> torch.Tensor:
        """[vocab_size] uint8, 1 at the dead token ids."""
        dead = torch.zeros(self.vocab_size, dtype=torch.uint8)
        dead[self.dead_token_ids] = 1
        return dead

    def live_mask(self, input_ids: torch.LongTensor) -> torch.Tensor | None:
        """[B, T] bool, False at dead tokens (their gate is 0); None when the config has no dead tokens."""
        return None if not self.dead_token_ids else self.dead_tokens[input_ids] == 0

    @torch.no_grad()
    def set_token_map(self, token_map: torch.Tensor) -> None:
        self.check_token_map(token_map)
        self.token_map.copy_(token_map.to(self.token_map.device))
        self.token_map_checked = True

    def check_token_map(self, token_map: torch.Tensor | None = None) -> None:
        """Raise a ValueError unless `token_map` (default: the stored one, then marked checked) fits the config."""
        stored = token_map is None
        token_map = self.token_map if stored else token_map
        if token_map.dtype not in (torch.int32, torch.int64) or token_map.shape != (self.vocab_size,):
            raise ValueError(
                f"token map has shape {tuple(token_map.shape)} and dtype {token_map.dtype}; the config needs an "
                f"integer tensor of shape ({self.vocab_size},) (vocab_size)."
            )
        if (token_map == -1).all():
            raise ValueError(
                "token map is unset: this config compresses the vocabulary "
                f"({self.vocab_size} -> {self.compressed_vocab_size} ids); call "
                "`model.set_token_map(build_token_map(tokenizer)[0])` before running the model."
            )
        if (token_map < 0).any():
            raise ValueError(f"token map holds negative compressed id {int(token_map.min())}.")
        distinct = int(torch.unique(token_map).numel())
        if int(token_map.max()) >= self.compressed_vocab_size or distinct != self.compressed_vocab_size:
            raise ValueError(
                f"token map has {distinct} distinct compressed ids up to {int(token_map.max())}, but the config "
                f"says engram_compressed_vocab_size={self.compressed_vocab_size}: the map was built for another "
                "tokenizer or config."
            )
        self.token_map_checked = self.token_map_checked or stored

    def resized_token_map(self, vocab_size: int) -> tuple[torch.Tensor, int]:
        """(token map [vocab_size], compressed vocabulary size) after `resize_token_embeddings(vocab_size)`: kept ids
        keep their compressed ids, so they hash as before bit for bit; each new id gets a compressed id of its own
        (V', V' + 1, ...). A ValueError names the way out where that cannot be exact."""
        rebuild = ("rebuild the token map for the new tokenizer (build_token_map) and start from a config with its "
                   "engram_compressed_vocab_size")
        if vocab_size < self.vocab_size:
            dead = [i for i in self.dead_token_ids if i >= vocab_size]
            if dead:
                raise ValueError(f"resizing to {vocab_size} tokens drops dead token ids {dead}; {rebuild}.")
            token_map = self.token_map[:vocab_size]
            compressed = int(token_map.max()) + 1
            if int(torch.unique(token_map).numel()) != compressed:
                raise ValueError(f"resizing to {vocab_size} tokens leaves compressed ids unused; {rebuild}.")
            return token_map.clone(), compressed
        added = vocab_size - self.vocab_size
        compressed = self.compressed_vocab_size + added
        limit = multiplier_limit(compressed)
        too_large = [m for ms in self.multipliers.values() for m in ms if m > limit]
        if too_large:
            raise ValueError(
                f"resizing to {vocab_size} tokens gives {compressed} compressed ids, and multiplier {max(too_large)} "
                f"times the largest would overflow int64 (the limit is {limit}); {rebuild}."
            )
        unset = bool((self.token_map == -1).all())
        new_ids = torch.arange(self.compressed_vocab_size, compressed, dtype=torch.long, device=self.token_map.device)
        return torch.cat([self.token_map, new_ids.fill_(-1) if unset else new_ids]), compressed

    @torch.no_grad()
    def resize(self, vocab_size: int) -> int:
        """Follow the token embedding to `vocab_size` ids (`resized_token_map`); returns the new compressed size."""
        token_map, compressed = self.resized_token_map(vocab_size)
        self.vocab_size, self.compressed_vocab_size = vocab_size, compressed
        self.token_map = nn.Buffer(token_map)
        self.dead_tokens = nn.Buffer(self.default_dead_tokens().to(self.token_map.device), persistent=False)
        self.token_map_checked = False
        return compressed

    def compress(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.LongTensor:
        """Compressed ids [B, T]; dead tokens give `DEAD`, positions where `attention_mask` is 0 the compressed pad id."""
        compressed = self.token_map[input_ids]
        if self.dead_token_ids:
            compressed = torch.where(self.dead_tokens[input_ids].bool(), DEAD, compressed)
        if attention_mask is not None:
            compressed = torch.where(attention_mask.bool(), compressed, self.token_map[self.pad_id])
        return compressed

    def start_history(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """The compressed ids read before a sequence starts: [B, max_ngram_size - 1] pad ids."""
        return self.token_map[self.pad_id].expand(input_ids.shape[0], self.max_ngram_size - 1)

    def hash_tokens(
        self, tokens: torch.LongTensor, doc_positions: torch.LongTensor | None = None
    ) -> dict[int, torch.LongTensor]:
        """Hash ids of compressed ids `tokens` [B, N-1+T] whose first N-1 entries are the history before them.

        `doc_positions` [B, T] (packed sequences): each token's index inside its own document; x'_{t-k} reads the pad
        id where k exceeds it, so no n-gram reaches into the previous document.
        Returns `{layer_id: LongTensor[B, T, (N-1) * H]}`: each head's row inside its own table, order 2 first.
        """
        n = self.max_ngram_size
        if doc_positions is None and use_triton(self.kernel, tokens, self.token_map):
            hash_ids = load_kernels().ngram_hash(
                tokens[:, n - 1 :], self.token_map, self.multiplier_tensor, self.table_size_tensor,
                pad_id=self.pad_id, history=tokens[:, : n - 1], compressed=True, dead=self._dead_for_kernel(),
            )
            return dict(zip(self.layer_ids, hash_ids.unbind(0)))
        layers, orders = len(self.layer_ids), n - 1
        windows = tokens.unfold(1, n, 1)  # [B, T, N]: windows[..., j] = x'_{t-(N-1)+j}
        if self.dead_token_ids:  # x'_{t-k} reads the pad id when any of x_{t-k} .. x_t is dead
            cut = (windows == DEAD).flip(-1).to(torch.uint8).cummax(-1).values.flip(-1).bool()
            windows = torch.where(cut, self.token_map[self.pad_id], windows)
        if doc_positions is not None:  # windows[..., j] reads k = N-1-j tokens back
            back = torch.arange(n - 1, -1, -1, device=windows.device)
            windows = torch.where(back > doc_positions.unsqueeze(-1), self.token_map[self.pad_id], windows)
        # products[..., j] = x'_{t-k} * m_k with k = N-1-j: [L, B, T, N]
        products = windows.unsqueeze(0) * self.multiplier_tensor.flip(-1).view(layers, 1, 1, n)
        mix = products[..., n - 1]
        mixes = []
        for k in range(1, n):
            mix = torch.bitwise_xor(mix, products[..., n - 1 - k])
            mixes.append(mix)
        sizes = self.table_size_tensor.view(layers, 1, 1, orders, self.n_head_per_ngram)
        hash_ids = torch.remainder(torch.stack(mixes, dim=-1).unsqueeze(-1), sizes).flatten(-2)  # [L, B, T, (N-1) H]
        return dict(zip(self.layer_ids, hash_ids.unbind(0)))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        doc_positions: torch.LongTensor | None = None,
    ) -> dict[int, torch.LongTensor]:
        """Hash ids of fresh sequences `input_ids` [B, T]: `{layer_id: LongTensor[B, T, (N-1) * H]}`. Packed
        documents (`doc_positions`, see `hash_tokens`) take the torch path: the kernel has no document boundaries."""
        if doc_positions is None and use_triton(self.kernel, input_ids, self.token_map):  # map, mask, hash: 1 launch
            hash_ids = load_kernels().ngram_hash(
                input_ids, self.token_map, self.multiplier_tensor, self.table_size_tensor,
                pad_id=self.pad_id, token_mask=attention_mask, dead=self._dead_for_kernel(),
            )
            return dict(zip(self.layer_ids, hash_ids.unbind(0)))
        compressed = self.compress(input_ids, attention_mask)
        return self.hash_tokens(torch.cat([self.start_history(input_ids), compressed], dim=1), doc_positions)

    def _dead_for_kernel(self) -> torch.Tensor | None:
        return self.dead_tokens if self.dead_token_ids else None

    def extra_repr(self) -> str:
        dead = f", dead_token_ids={self.dead_token_ids}" if self.dead_token_ids else ""
        return (
            f"layers={self.layer_ids}, max_ngram_size={self.max_ngram_size}, heads={self.n_head_per_ngram}, "
            f"compressed_vocab_size={self.compressed_vocab_size}{dead}"
        )


__all__ = ["EngramHasher"]
