"""The inventory formats `--fleet` reads besides our own YAML, each a small module that produces one model
(`model.FleetSpec`: hosts with their fields parsed, groups with their members) which `config/inventory.py`
turns into `Device` records: Ansible INI and YAML (`ansible_ini`, `ansible_yaml`, read together with their
group_vars/host_vars by `ansible`), MACE's `devices.yml` (`mace_devices`) and ssh_config aliases
(`ssh_aliases`). `detect` picks one by content (docs/inventory.md).
"""
