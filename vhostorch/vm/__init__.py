"""A VM as the user declares it (spec: library types or TOML) and what vhostorch started for it
(state: one JSON file per VM)."""
