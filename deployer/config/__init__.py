"""What the user writes, read into frozen records with file:line errors: the inventory (and ssh_config), the
kernels manifest, the model format.
"""
