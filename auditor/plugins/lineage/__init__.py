"""The lineage test: was the suspect's weights derived from the reference's? An exact permutation p-value per
layer under the null of independent initialisation (docs/lineage.md)."""
