"""Showers as two parallel token streams (voxel, energy) with append-only vocabularies."""

from calofm.tokenizer.energy_bins import LogEnergyBins
from calofm.tokenizer.tokenizer import (
    BOS, DEFAULT_ORDER, EOS, ORDERS, PAD, SPECIALS, Hits, ShowerTokenizer, TokenizedShowers, canonical_particle,
    check_order, incident_feature,
)
from calofm.tokenizer.vocab import Block, Vocabulary

__all__ = ["BOS", "DEFAULT_ORDER", "EOS", "ORDERS", "PAD", "SPECIALS", "Block", "Hits", "LogEnergyBins",
           "ShowerTokenizer", "TokenizedShowers", "Vocabulary", "canonical_particle", "check_order",
           "incident_feature"]
