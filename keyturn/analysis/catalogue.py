"""Curated data for classifying PostgreSQL statements: functions, settings, statement kinds.

This module is data only.  Classification tables map a name to ``(class, reason)`` where
``class`` is the *value* of a ``keyturn.analysis.StatementClass`` member ("read", "write",
...) and ``reason`` is a short phrase completing "function <name> ..." (or "" when a reviewer
needs no explanation); the last section holds display names for commands.  ``postgres.py``
converts the strings to enum members at import time, so a typo here fails loudly when the
package is imported.

It must not contain logic, and it must not import the analyser: the analyser imports it.
Anything *missing* from this catalogue is treated as risky by the analyser (fail closed), so
the lists below only need to be right, not complete.  Add a name only after checking what the
function does in the PostgreSQL documentation.

How built-in functions are classified, and how this catalogue was audited
-------------------------------------------------------------------------
``pg_builtins.txt`` (next to this file, written by ``scripts/gen_pg_builtins.py``) lists every
function name in pg_catalog.  The analyser looks a called built-in up here first and treats
one that is listed there but not here as a READ; a name in neither place is an unknown
function.  So every built-in with a side effect must have an entry below.

The catalogue was audited against the full list from PostgreSQL 15.18 (2,646 names): the
list was reviewed by hand (type input/output, operator and index-support functions by their
naming only), contrib extensions were installed to list dblink, adminpack, lo, pg_surgery,
... for EXTENSION_FUNCTIONS, and every name matching one of ``AUDIT_PATTERNS`` (lo_*, pg_ls_*,
pg_read_*, *file*, pg_stat_reset*, *slot*, *wal*, *backup*, *advisory*, terminate/cancel/
reload/rotate/promote, sequences, notify, set*, summarize, gin_clean, binary_upgrade_*,
import/export, restore, *_to_xml*, pg_log_*, pg_create_/pg_drop_/pg_copy_*, replication and
origins, replay, pg_switch*, txid_current/pg_current_xact*, *next*, sleep, flush,
extension, write/unlink/truncate/reset/clear/advance/emit/create/drop/put/setup/sync,
start/stop, query/cursor/sql/exec/eval, kill/shutdown/restart, vacuum/checkpoint) has an
explicit entry, a read included (``_AUDITED_READS``).  tests/test_analysis.py enforces the
latter, so a regenerated list with a new risky-looking built-in fails until it is classified
here.  Entries for functions newer than 15 (``pg_sync_replication_slots``, ``uuidv7``, ...)
come from the PostgreSQL 16-18 documentation.
"""

from __future__ import annotations

from collections.abc import Mapping

Entry = tuple[str, str]


def _same(cls: str, reason: str, names: str) -> dict[str, Entry]:
    # Whitespace-separated name lists keep the long read-only lists readable.
    return {name: (cls, reason) for name in names.split()}


# Built-in functions that only compute a value from their arguments or read data the caller
# can already read with SELECT.  Resolved unqualified or as pg_catalog.<name>.  A built-in
# needs no entry to be a read (pg_builtins.txt covers it); these document common reads and
# cover functions added after the PostgreSQL version pg_builtins.txt was generated from.
_READS = _same("read", "", """
    count sum avg min max array_agg string_agg json_agg json_agg_strict jsonb_agg
    jsonb_agg_strict json_object_agg jsonb_object_agg json_object_agg_strict
    jsonb_object_agg_strict json_object_agg_unique jsonb_object_agg_unique bool_and bool_or
    every bit_and bit_or bit_xor stddev stddev_pop stddev_samp variance var_pop var_samp corr
    covar_pop covar_samp regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope
    regr_sxx regr_sxy regr_syy percentile_cont percentile_disc mode any_value range_agg
    range_intersect_agg xmlagg
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value
    nth_value
    lower upper initcap length char_length character_length octet_length bit_length substr
    substring position strpos concat concat_ws replace trim btrim ltrim rtrim lpad rpad left
    right repeat reverse translate split_part starts_with format to_char to_number ascii chr
    regexp_replace regexp_match regexp_matches regexp_split_to_array regexp_split_to_table
    regexp_count regexp_instr regexp_like regexp_substr similar_to_escape like_escape
    string_to_array string_to_table array_to_string quote_ident quote_literal quote_nullable
    md5 sha224 sha256 sha384 sha512 crc32 crc32c encode decode convert convert_from convert_to
    to_hex to_bin to_oct to_ascii unistr casefold normalize is_normalized overlay parse_ident
    get_byte set_byte get_bit set_bit bit_count pg_collation_for
    abs cbrt ceil ceiling degrees div exp factorial floor gcd lcm ln log log10 min_scale mod
    pi power pow radians round scale sign sqrt trim_scale trunc width_bucket random
    random_normal acos acosd asin asind atan atand atan2 atan2d cos cosd cot cotd sin sind
    tan tand sinh cosh tanh asinh acosh atanh erf erfc gamma lgamma numeric_inc
    now clock_timestamp statement_timestamp transaction_timestamp timeofday age date_bin
    date_part date_trunc extract isfinite justify_days justify_hours justify_interval
    make_date make_interval make_time make_timestamp make_timestamptz timezone overlaps
    to_date to_timestamp date_add date_subtract
    to_json to_jsonb array_to_json row_to_json json_build_array jsonb_build_array
    json_build_object jsonb_build_object json_object jsonb_object json_array_elements
    jsonb_array_elements json_array_elements_text jsonb_array_elements_text json_array_length
    jsonb_array_length json_each jsonb_each json_each_text jsonb_each_text json_extract_path
    jsonb_extract_path json_extract_path_text jsonb_extract_path_text json_object_keys
    jsonb_object_keys json_populate_record jsonb_populate_record json_populate_recordset
    jsonb_populate_recordset json_to_record jsonb_to_record json_to_recordset
    jsonb_to_recordset json_strip_nulls jsonb_strip_nulls jsonb_set jsonb_set_lax
    jsonb_insert jsonb_pretty json_typeof jsonb_typeof jsonb_path_exists jsonb_path_match
    jsonb_path_query jsonb_path_query_array jsonb_path_query_first jsonb_path_exists_tz
    jsonb_path_match_tz jsonb_path_query_tz jsonb_path_query_array_tz
    jsonb_path_query_first_tz jsonb_populate_record_valid
    array_append array_cat array_dims array_fill array_length array_lower array_upper
    array_ndims array_position array_positions array_prepend array_remove array_replace
    array_sample array_shuffle array_reverse array_sort cardinality trim_array unnest
    generate_series generate_subscripts
    to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery ts_rank
    ts_rank_cd ts_headline setweight strip numnode querytree tsvector_to_array
    array_to_tsvector ts_delete ts_filter ts_lexize ts_debug ts_parse ts_token_type
    get_current_ts_config
    xpath xpath_exists xml_is_well_formed xml_is_well_formed_document
    xml_is_well_formed_content xmlcomment xmlconcat xmltext
    host hostmask masklen netmask network broadcast abbrev family inet_merge
    inet_same_family set_masklen text
    lower_inc upper_inc lower_inf upper_inf isempty range_merge multirange
    num_nonnulls num_nulls gen_random_uuid uuid_extract_timestamp uuid_extract_version
    uuidv4 uuidv7
    version current_database current_query current_schemas pg_backend_pid pg_typeof
    format_type to_regclass to_regtype to_regtypemod to_regproc to_regprocedure to_regoper
    to_regoperator to_regnamespace to_regrole to_regcollation pg_get_viewdef
    pg_get_functiondef pg_get_function_arguments pg_get_function_identity_arguments
    pg_get_function_result pg_get_indexdef pg_get_constraintdef pg_get_expr
    pg_get_triggerdef pg_get_ruledef pg_get_statisticsobjdef pg_get_partkeydef
    pg_get_serial_sequence pg_get_userbyid pg_get_keywords pg_get_catalog_foreign_keys
    pg_get_object_address pg_identify_object pg_identify_object_as_address pg_describe_object
    pg_table_size pg_relation_size pg_total_relation_size pg_indexes_size pg_database_size
    pg_tablespace_size pg_size_pretty pg_size_bytes pg_column_size pg_column_compression
    pg_column_toast_chunk_id pg_relation_filenode pg_relation_filepath pg_filenode_relation
    pg_tablespace_location pg_tablespace_databases
    has_table_privilege has_column_privilege has_any_column_privilege has_schema_privilege
    has_database_privilege has_function_privilege has_sequence_privilege
    has_language_privilege has_tablespace_privilege has_type_privilege
    has_server_privilege has_foreign_data_wrapper_privilege has_parameter_privilege
    has_largeobject_privilege pg_has_role row_security_active
    obj_description col_description shobj_description pg_encoding_to_char
    pg_char_to_encoding pg_client_encoding pg_jit_available pg_listening_channels
    pg_notification_queue_usage pg_trigger_depth pg_my_temp_schema pg_is_other_temp_schema
    pg_table_is_visible pg_type_is_visible pg_function_is_visible pg_operator_is_visible
    pg_opclass_is_visible pg_opfamily_is_visible pg_collation_is_visible
    pg_conversion_is_visible pg_statistics_obj_is_visible pg_ts_parser_is_visible
    pg_ts_dict_is_visible pg_ts_template_is_visible pg_ts_config_is_visible
    pg_options_to_table pg_settings_get_flags pg_input_is_valid pg_input_error_info
    pg_index_column_has_property pg_index_has_property pg_indexam_has_property
    pg_get_acl pg_basetype pg_char_to_encoding acldefault aclexplode makeaclitem
    inet_client_addr inet_client_port inet_server_addr inet_server_port
    pg_postmaster_start_time pg_conf_load_time pg_current_logfile pg_is_in_recovery
    pg_is_wal_replay_paused pg_get_wal_replay_pause_state pg_last_wal_receive_lsn
    pg_last_wal_replay_lsn pg_last_xact_replay_timestamp pg_current_wal_lsn
    pg_current_wal_insert_lsn pg_current_wal_flush_lsn pg_walfile_name
    pg_walfile_name_offset pg_split_walfile_name pg_wal_lsn_diff pg_blocking_pids
    pg_safe_snapshot_blocking_pids pg_isolation_test_session_is_blocked
    pg_control_checkpoint pg_control_system pg_control_init pg_control_recovery
    pg_get_replication_slots pg_available_extensions pg_available_extension_versions
    pg_show_all_settings pg_show_all_file_settings
    pg_hba_file_rules pg_ident_file_mappings pg_get_backend_memory_contexts
    pg_get_shmem_allocations pg_stat_get_activity pg_stat_get_backend_pid
    pg_stat_get_numscans pg_stat_get_tuples_returned pg_stat_get_live_tuples
    pg_stat_get_dead_tuples pg_stat_get_db_numbackends pg_stat_get_wal pg_stat_get_io
    pg_lock_status pg_prepared_xact pg_cursor pg_prepared_statement pg_timezone_names
    pg_timezone_abbrevs pg_sequence_parameters pg_sequence_last_value pg_get_sequence_data
    currval lastval pg_current_xact_id_if_assigned txid_current_if_assigned
    pg_current_snapshot pg_snapshot_xmin pg_snapshot_xmax pg_snapshot_xip
    pg_visible_in_snapshot txid_current_snapshot txid_snapshot_xmin txid_snapshot_xmax
    txid_snapshot_xip txid_visible_in_snapshot pg_xact_status txid_status
    pg_xact_commit_timestamp pg_xact_commit_timestamp_origin pg_last_committed_xact
    pg_get_multixact_members pg_age pg_mxid_age mxid_age
    current_setting loread lo_get lo_lseek lo_lseek64 lo_tell lo_tell64 lo_close
""")

# Built-ins whose names match an AUDIT_PATTERNS entry and that were checked and found to
# only read (statistics getters, replication-origin progress, validators, ...).
_AUDITED_READS = _same("read", "", """
    pg_event_trigger_dropped_objects pg_extension_update_paths pg_get_wal_resource_managers
    pg_replication_origin_oid pg_replication_origin_progress
    pg_replication_origin_session_is_setup pg_replication_origin_session_progress
    pg_show_replication_origin_status pg_stat_have_stats pg_stat_get_replication_slot
    pg_stat_get_subscription_stats pg_stat_get_wal_receiver pg_stat_get_wal_senders
    pg_stat_get_bgwriter_stat_reset_time pg_stat_get_db_stat_reset_time
    pg_stat_get_buf_fsync_backend pg_stat_get_checkpoint_sync_time
    pg_stat_get_checkpoint_write_time pg_stat_get_db_blk_write_time pg_stat_get_db_temp_files
    pg_stat_get_bgwriter_buf_written_checkpoints pg_stat_get_bgwriter_requested_checkpoints
    pg_stat_get_bgwriter_timed_checkpoints pg_stat_get_autovacuum_count
    pg_stat_get_vacuum_count pg_stat_get_last_vacuum_time pg_stat_get_last_autovacuum_time
    pg_stat_get_ins_since_vacuum pg_stat_get_db_sessions_killed
    pg_stat_get_backend_activity_start pg_stat_get_backend_start
    pg_stat_get_backend_xact_start prsd_start prsd_nexttoken
    gin_extract_jsonb_query gin_extract_jsonb_query_path pg_get_function_sqlbody
    fmgr_sql_validator plpgsql_validator postgresql_fdw_validator
""")

_NOTED_READS: dict[str, Entry] = {
    **_same("read", "waits on the server (holds a connection and any locks taken so far)",
            "pg_sleep pg_sleep_for pg_sleep_until"),
}

_SESSION = {
    **_same("lock", "takes an advisory lock that can block other sessions", """
        pg_advisory_lock pg_advisory_lock_shared pg_advisory_xact_lock
        pg_advisory_xact_lock_shared pg_try_advisory_lock pg_try_advisory_lock_shared
        pg_try_advisory_xact_lock pg_try_advisory_xact_lock_shared
    """),
    **_same("session", "releases an advisory lock held by this session", """
        pg_advisory_unlock pg_advisory_unlock_shared pg_advisory_unlock_all
    """),
    "set_config": ("session", "changes a session setting"),
    "setseed": ("session", "changes this session's random seed"),
    "pg_export_snapshot": ("session", "exports a snapshot other sessions can import"),
    "pg_stat_clear_snapshot": ("session", "discards this session's statistics snapshot"),
    "pg_stat_force_next_flush": ("session", "forces a statistics flush"),
}

_WRITES = {
    **_same("write", "changes a sequence", "nextval setval"),
    **_same("write", "creates, changes or deletes a large object", """
        lo_create lo_creat lo_unlink lo_write lowrite lo_put lo_truncate lo_truncate64
        lo_from_bytea lo_open
    """),
    **_same("write", "assigns a transaction id (the transaction becomes a writer)",
            "txid_current pg_current_xact_id"),
    "pg_notify": ("write", "sends a notification to other sessions"),
}

_DDL = {
    "pg_import_system_collations": ("ddl", "creates collations from the operating system's "
                                           "locales"),
    "pg_extension_config_dump": ("ddl", "marks a table as extension configuration"),
}

# Entry points of procedural languages: they run code the gateway cannot inspect (they take
# an internal argument, so SQL cannot call them usefully, but that is PostgreSQL's check).
_PROCEDURAL = _same("procedural", "is a procedural-language handler",
                    "plpgsql_call_handler plpgsql_inline_handler")

_ADMIN = {
    **_same("admin", "signals another server process", "pg_terminate_backend pg_cancel_backend"),
    **_same("admin", "changes server operation", """
        pg_reload_conf pg_rotate_logfile pg_rotate_logfile_old pg_switch_wal pg_switch_xlog
        pg_create_restore_point pg_promote pg_start_backup pg_stop_backup pg_backup_start
        pg_backup_stop pg_wal_replay_pause pg_wal_replay_resume
        pg_log_backend_memory_contexts pg_nextoid pg_stop_making_pinned_objects
    """),
    **_same("admin", "runs index maintenance", """
        brin_summarize_new_values brin_summarize_range brin_desummarize_range
        gin_clean_pending_list
    """),
    **_same("admin", "is for pg_upgrade only and changes catalog internals", """
        binary_upgrade_create_empty_extension binary_upgrade_set_missing_value
        binary_upgrade_set_next_array_pg_type_oid binary_upgrade_set_next_heap_pg_class_oid
        binary_upgrade_set_next_heap_relfilenode binary_upgrade_set_next_index_pg_class_oid
        binary_upgrade_set_next_index_relfilenode
        binary_upgrade_set_next_multirange_array_pg_type_oid
        binary_upgrade_set_next_multirange_pg_type_oid binary_upgrade_set_next_pg_authid_oid
        binary_upgrade_set_next_pg_enum_oid binary_upgrade_set_next_pg_tablespace_oid
        binary_upgrade_set_next_pg_type_oid binary_upgrade_set_next_toast_pg_class_oid
        binary_upgrade_set_next_toast_relfilenode binary_upgrade_set_record_init_privs
        binary_upgrade_logical_slot_has_caught_up binary_upgrade_add_sub_rel_state
        binary_upgrade_replorigin_advance
    """),
    **_same("admin", "manages replication", """
        pg_create_physical_replication_slot pg_create_logical_replication_slot
        pg_drop_replication_slot pg_copy_physical_replication_slot
        pg_copy_logical_replication_slot pg_replication_slot_advance pg_sync_replication_slots
        pg_logical_slot_get_changes pg_logical_slot_peek_changes
        pg_logical_slot_get_binary_changes pg_logical_slot_peek_binary_changes
        pg_logical_emit_message pg_replication_origin_create pg_replication_origin_drop
        pg_replication_origin_session_setup pg_replication_origin_session_reset
        pg_replication_origin_advance pg_replication_origin_xact_setup
        pg_replication_origin_xact_reset
    """),
    **_same("admin", "resets or rewrites server statistics", """
        pg_stat_reset pg_stat_reset_shared pg_stat_reset_single_table_counters
        pg_stat_reset_single_function_counters pg_stat_reset_slru
        pg_stat_reset_replication_slot pg_stat_reset_subscription_stats
        pg_stat_reset_backend_stats pg_restore_relation_stats pg_restore_attribute_stats
        pg_clear_relation_stats pg_clear_attribute_stats
    """),
}

# adminpack's functions are listed here, not among EXTENSION_FUNCTIONS: adminpack always
# installs into pg_catalog (it is not relocatable).  They are not in pg_builtins.txt.
_FILES = {
    **_same("file", "reads server files",
            "pg_read_file pg_read_binary_file pg_read_file_old pg_file_read"),
    **_same("file", "lists or inspects server directories", """
        pg_ls_dir pg_ls_logdir pg_ls_waldir pg_ls_tmpdir pg_ls_archive_statusdir
        pg_ls_logicalsnapdir pg_ls_logicalmapdir pg_ls_replslotdir pg_ls_summariesdir
        pg_stat_file pg_logdir_ls pg_file_length
    """),
    **_same("file", "writes, renames or deletes server files (adminpack)",
            "pg_file_write pg_file_rename pg_file_unlink pg_file_sync"),
    "pg_logfile_rotate": ("admin", "rotates the server log (adminpack 1.0)"),
    "lo_import": ("file", "reads a server file into a large object"),
    "lo_export": ("file", "writes a large object to a server file"),
}

# Functions that run SQL handed to them as a string (or read a table named by a string):
# the gateway cannot see what that SQL does, so they are as risky as unparseable input.
_OPAQUE = _same("unknown", "runs SQL (or reads a table) named in a string, which is not analysed",
                """
    query_to_xml query_to_xmlschema query_to_xml_and_xmlschema cursor_to_xml
    cursor_to_xmlschema table_to_xml table_to_xmlschema table_to_xml_and_xmlschema
    schema_to_xml schema_to_xmlschema schema_to_xml_and_xmlschema database_to_xml
    database_to_xmlschema database_to_xml_and_xmlschema ts_stat ts_rewrite
""")

#: Built-in functions (they live in pg_catalog).  A call qualified with any other schema is
#: a different, user-defined function and is not looked up here.
BUILTIN_FUNCTIONS: Mapping[str, Entry] = {
    **_READS, **_AUDITED_READS, **_NOTED_READS, **_SESSION, **_WRITES, **_DDL, **_PROCEDURAL,
    **_ADMIN, **_FILES, **_OPAQUE,
}

#: Extension functions.  Extensions install into a schema of the installer's choosing, so
#: these match by name whatever the schema (every entry is riskier than or as risky as an
#: unknown function, so matching too eagerly only errs towards caution).
EXTENSION_FUNCTIONS: Mapping[str, Entry] = {
    **_same("admin", "runs SQL on another server (dblink)", """
        dblink dblink_exec dblink_connect dblink_connect_u dblink_send_query dblink_open
        dblink_fetch dblink_close dblink_get_result dblink_disconnect dblink_cancel_query
    """),
    **_same("admin", "uses or inspects connections to another server (dblink)", """
        dblink_get_connections dblink_is_busy dblink_error_message dblink_get_notify
        dblink_current_query dblink_get_pkey dblink_build_sql_insert dblink_build_sql_delete
        dblink_build_sql_update dblink_fdw_validator
    """),
    **_same("unknown", "runs SQL given as a string (tablefunc), which is not analysed",
            "crosstab crosstab2 crosstab3 crosstab4 connectby"),
    "xpath_table": ("unknown", "runs SQL built from strings (xml2), which is not analysed"),
    "lo_manage": ("write", "deletes large objects (lo extension trigger)"),
    "pg_stat_statements_reset": ("admin", "resets server statistics"),
    "pg_prewarm": ("admin", "loads relations into the server's buffer cache"),
    **_same("admin", "controls the autoprewarm worker (pg_prewarm)",
            "autoprewarm_start_worker autoprewarm_dump_now"),
    **_same("admin", "rewrites tuples directly, bypassing MVCC (pg_surgery)",
            "heap_force_kill heap_force_freeze"),
    "pg_truncate_visibility_map": ("admin", "truncates a relation's visibility map "
                                            "(pg_visibility)"),
}

#: Regular expressions (``re.search``) for built-in function names that look risky.  Every
#: name in pg_builtins.txt matching one must have an entry in BUILTIN_FUNCTIONS (a read
#: included), so regenerating the list cannot silently make such a function a READ.
AUDIT_PATTERNS: tuple[str, ...] = (
    r"^lo_", r"^lo(read|write)$", r"^pg_ls_", r"^pg_read_", r"file",
    r"^pg_stat_(reset|clear|force)", r"slot", r"wal", r"backup", r"advisory",
    r"terminate|cancel|reload|rotate|promote|signal",
    r"^(set|next|curr|last)val$", r"sequence", r"notif|listen", r"^set", r"set_config|_conf$",
    r"summarize", r"gin_clean", r"^binary_upgrade_", r"import|export", r"restore", r"_to_xml",
    r"^pg_log_", r"^pg_(create|drop|copy)_", r"replication|^pg_logical|origin", r"replay",
    r"^pg_switch", r"^pg_current_xact|^txid_current", r"next", r"sleep", r"flush", r"extension",
    r"(^|_)write|unlink|truncate|(^|_)reset|clear|advance|emit|(^|_)create|(^|_)drop|_put$",
    r"setup|sync", r"^pg_file_|logdir", r"dblink", r"prewarm", r"_stats$",
    r"(^|_)(start|stop)(_|$)", r"(^|_)query(_|$)|cursor|sql|exec|eval|^ts_(stat|rewrite)$",
    r"kill|shutdown|restart", r"vacuum|checkpoint",
)

#: Session settings (GUCs) whose change deserves more than the SESSION class, for SET and
#: set_config().  Names are compared lowercased, as PostgreSQL does.
SETTINGS: Mapping[str, Entry] = {
    "search_path": ("session", "changes how unqualified names resolve"),

    **_same("admin", "changes what the server logs (audit trail)", """
        log_statement log_min_duration_statement log_min_messages log_min_error_statement
        log_duration log_parameter_max_length log_parameter_max_length_on_error
        log_statement_sample_rate log_transaction_sample_rate log_replication_commands
        log_lock_waits log_temp_files log_error_verbosity log_executor_stats
        log_parser_stats log_planner_stats log_statement_stats
    """),
    **_same("admin", "weakens server safety checks", """
        allow_system_table_mods zero_damaged_pages ignore_system_indexes
        ignore_checksum_failure ignore_invalid_pages lo_compat_privileges
    """),
    **_same("file", "loads shared libraries from the server's file system", """
        dynamic_library_path local_preload_libraries session_preload_libraries
    """),
}

#: Settings that guard the server against runaway or unchecked work, and how a value turns
#: the guard off: "duration" settings (milliseconds) when the value the server reads is 0,
#: "bool" settings when it is not on, "any" settings whatever the value.  Turning one off,
#: or RESET / DEFAULT (which may undo what the operator configured), is class SAFETY; other
#: values are plain SESSION.  Values are read the way the server reads them (see
#: postgres._disables), and a value that cannot be read is treated as turning the guard off.
#: A statement's table that stands for "any table" (policy rules: keyturn.policy).
ANY_TABLE = "*"
#: Catalog views and tables that show values of any table: planner statistics (most
#: common values, histograms, MCV lists) and other sessions' statement texts (every user
#: reaches the target as the same role, so they see each other's queries and literals).
READS_ANY_TABLE = frozenset({"pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic",
                             "pg_statistic_ext_data", "pg_stat_activity",
                             # every sequence's last value
                             "pg_sequences"})
#: The same, in whatever schema the extension providing them was installed.
READS_ANY_TABLE_ANYWHERE = frozenset({"pg_stat_statements", "pg_stat_monitor"})
#: Functions that show values of any table (other sessions' statement texts).
READS_ANY_TABLE_FUNCTIONS = frozenset({"pg_catalog.pg_stat_get_activity",
                                       "pg_catalog.pg_stat_get_backend_activity"})
#: Functions whose first argument names a relation whose data they show (a sequence's
#: values): that relation counts as read.
RELATION_ARGUMENT_FUNCTIONS = frozenset({"pg_catalog.pg_sequence_last_value",
                                         "pg_catalog.pg_sequence_parameters",
                                         "pg_catalog.pg_get_sequence_data",
                                         "pg_catalog.currval",
                                         # these change it (and show its value)
                                         "pg_catalog.nextval", "pg_catalog.setval"})

SAFETY_SETTINGS: Mapping[str, str] = {
    "statement_timeout": "duration",
    "lock_timeout": "duration",
    "idle_in_transaction_session_timeout": "duration",
    "idle_session_timeout": "duration",
    "transaction_timeout": "duration",
    # replica disables triggers and foreign-key checks, origin re-enables them where the
    # operator set replica.  Superuser only on the server.
    "session_replication_role": "any",
    "row_security": "bool",
    "check_function_bodies": "bool",
}

#: Time units the server accepts after a number of milliseconds (case-sensitive), with
#: their size in milliseconds, largest first like the server's conversion table.
TIME_UNITS_MS: tuple[tuple[str, float], ...] = (
    ("d", 86_400_000.0), ("h", 3_600_000.0), ("min", 60_000.0), ("s", 1000.0),
    ("ms", 1.0), ("us", 0.001))

#: The target session's read/write mode, which the gateway holds (read-only except for
#: statements it lets write): only "on" may be set by a client.
READ_ONLY_SETTINGS: frozenset[str] = frozenset({"default_transaction_read_only",
                                                "transaction_read_only"})

#: Setting-name prefixes treated like SETTINGS entries (extension-owned settings).
SETTING_PREFIXES: Mapping[str, Entry] = {
    "pgaudit.": ("admin", "changes what the server logs (audit trail)"),
}

#: Settings whose change alters who the session is.  Changing them is never allowed
#: through the gateway, whatever the value (RESET included).
IDENTITY_SETTINGS: frozenset[str] = frozenset({"role", "session_authorization"})

#: Spellings PostgreSQL accepts for the UTF8 encoding, after lowercasing and removing every
#: character that is not a letter or digit (which is how PostgreSQL compares them too).
UTF8_NAMES: frozenset[str] = frozenset({"utf8", "unicode"})

#: Values PostgreSQL reads as boolean true (parse_bool accepts unique prefixes).
TRUE_WORDS: frozenset[str] = frozenset({"on", "true", "tru", "tr", "t", "yes", "ye", "y", "1"})

#: Statement kinds (parse-tree node names) whose class does not depend on their content.
#: Statements with content-dependent classes (SELECT, COPY, EXPLAIN, SET, ...) are handled
#: in code; they are not listed here.  A node name in neither place is UNKNOWN.
STATEMENTS: Mapping[str, Entry] = {
    # transaction control
    "ConstraintsSetStmt": ("transaction", "SET CONSTRAINTS changes constraint timing"),
    # session state
    "ListenStmt": ("session", "LISTEN subscribes to notifications"),
    "UnlistenStmt": ("session", "UNLISTEN unsubscribes from notifications"),
    "FetchStmt": ("read", "FETCH/MOVE reads from an open cursor"),
    "ClosePortalStmt": ("read", "CLOSE closes a cursor"),
    "VariableShowStmt": ("read", "SHOW reads a setting"),
    "ReturnStmt": ("read", "RETURN computes a value"),
    # writes
    "NotifyStmt": ("write", "NOTIFY sends a notification to other sessions"),
    "LockStmt": ("lock", "LOCK takes table locks that block other sessions"),
    "RefreshMatViewStmt": ("write", "REFRESH MATERIALIZED VIEW rewrites its contents"),
    # schema changes
    "TruncateStmt": ("ddl", "TRUNCATE removes every row at once (not MVCC-safe, exclusive lock)"),
    "CreateStmt": ("ddl", "CREATE TABLE changes the schema"),
    "CreateForeignTableStmt": ("ddl", "CREATE FOREIGN TABLE changes the schema"),
    "ViewStmt": ("ddl", "CREATE VIEW stores a query that runs later"),
    "IndexStmt": ("ddl", "CREATE INDEX changes the schema"),
    "RuleStmt": ("ddl", "CREATE RULE rewrites future statements"),
    "CreateTrigStmt": ("ddl", "CREATE TRIGGER runs a function on future writes"),
    "CreateSeqStmt": ("ddl", "CREATE SEQUENCE changes the schema"),
    "AlterSeqStmt": ("ddl", "ALTER SEQUENCE changes the schema"),
    "CreateSchemaStmt": ("ddl", "CREATE SCHEMA changes the schema"),
    "CreateDomainStmt": ("ddl", "CREATE DOMAIN changes the schema"),
    "AlterDomainStmt": ("ddl", "ALTER DOMAIN changes the schema"),
    "CompositeTypeStmt": ("ddl", "CREATE TYPE changes the schema"),
    "CreateEnumStmt": ("ddl", "CREATE TYPE changes the schema"),
    "CreateRangeStmt": ("ddl", "CREATE TYPE changes the schema"),
    "AlterEnumStmt": ("ddl", "ALTER TYPE changes the schema"),
    "AlterTypeStmt": ("ddl", "ALTER TYPE changes the schema"),
    "DefineStmt": ("ddl", "CREATE (aggregate, operator, type, ...) changes the schema"),
    "CreateCastStmt": ("ddl", "CREATE CAST changes how values convert"),
    "CreateConversionStmt": ("ddl", "CREATE CONVERSION changes the schema"),
    "CreateTransformStmt": ("ddl", "CREATE TRANSFORM changes the schema"),
    "CreateOpClassStmt": ("ddl", "CREATE OPERATOR CLASS changes the schema"),
    "CreateOpFamilyStmt": ("ddl", "CREATE OPERATOR FAMILY changes the schema"),
    "AlterOpFamilyStmt": ("ddl", "ALTER OPERATOR FAMILY changes the schema"),
    "AlterOperatorStmt": ("ddl", "ALTER OPERATOR changes the schema"),
    "CreateStatsStmt": ("ddl", "CREATE STATISTICS changes the schema"),
    "AlterStatsStmt": ("ddl", "ALTER STATISTICS changes the schema"),
    "AlterTSConfigurationStmt": ("ddl", "ALTER TEXT SEARCH CONFIGURATION changes the schema"),
    "AlterTSDictionaryStmt": ("ddl", "ALTER TEXT SEARCH DICTIONARY changes the schema"),
    "AlterCollationStmt": ("ddl", "ALTER COLLATION changes the schema"),
    "AlterObjectDependsStmt": ("ddl", "ALTER ... DEPENDS ON EXTENSION changes the schema"),
    "AlterObjectSchemaStmt": ("ddl", "ALTER ... SET SCHEMA changes the schema"),
    "CommentStmt": ("ddl", "COMMENT changes catalog metadata"),
    "SecLabelStmt": ("ddl", "SECURITY LABEL changes catalog metadata"),
    "ReplicaIdentityStmt": ("ddl", "REPLICA IDENTITY changes the schema"),
    # privileges and identity
    "CreateRoleStmt": ("privilege", "CREATE ROLE changes who can connect"),
    "AlterRoleStmt": ("privilege", "ALTER ROLE changes a role's rights"),
    "AlterRoleSetStmt": ("privilege", "ALTER ROLE ... SET changes a role's defaults"),
    "DropRoleStmt": ("privilege", "DROP ROLE removes a role"),
    "AlterDefaultPrivilegesStmt": ("privilege", "ALTER DEFAULT PRIVILEGES changes future grants"),
    "AlterOwnerStmt": ("privilege", "ALTER ... OWNER TO changes ownership"),
    "ReassignOwnedStmt": ("privilege", "REASSIGN OWNED changes ownership"),
    "DropOwnedStmt": ("privilege", "DROP OWNED drops objects and revokes privileges"),
    "CreatePolicyStmt": ("privilege", "CREATE POLICY changes row-level access"),
    "AlterPolicyStmt": ("privilege", "ALTER POLICY changes row-level access"),
    # code the gateway cannot inspect
    "DoStmt": ("procedural", "DO runs an anonymous code block that is not analysed"),
    # server administration
    "VacuumStmt": ("admin", "VACUUM/ANALYZE is maintenance work"),
    "ClusterStmt": ("admin", "CLUSTER rewrites a table under an exclusive lock"),
    "ReindexStmt": ("admin", "REINDEX rebuilds indexes under heavy locks"),
    "CheckPointStmt": ("admin", "CHECKPOINT forces a server checkpoint"),
    "AlterSystemStmt": ("admin", "ALTER SYSTEM changes the server configuration"),
    "CreateExtensionStmt": ("admin", "CREATE EXTENSION installs code into the database"),
    "AlterExtensionStmt": ("admin", "ALTER EXTENSION changes installed code"),
    "AlterExtensionContentsStmt": ("admin", "ALTER EXTENSION changes installed code"),
    "CreatePLangStmt": ("admin", "CREATE LANGUAGE installs a procedural language"),
    "CreateAmStmt": ("admin", "CREATE ACCESS METHOD installs server code"),
    "CreateEventTrigStmt": ("admin", "CREATE EVENT TRIGGER runs code on every DDL"),
    "AlterEventTrigStmt": ("admin", "ALTER EVENT TRIGGER changes code run on every DDL"),
    "CreateFdwStmt": ("admin", "CREATE FOREIGN DATA WRAPPER installs server code"),
    "AlterFdwStmt": ("admin", "ALTER FOREIGN DATA WRAPPER changes server code"),
    "CreateForeignServerStmt": ("admin", "CREATE SERVER defines a connection elsewhere"),
    "AlterForeignServerStmt": ("admin", "ALTER SERVER changes a connection elsewhere"),
    "CreateUserMappingStmt": ("admin", "CREATE USER MAPPING stores remote credentials"),
    "AlterUserMappingStmt": ("admin", "ALTER USER MAPPING changes remote credentials"),
    "DropUserMappingStmt": ("admin", "DROP USER MAPPING removes remote credentials"),
    "ImportForeignSchemaStmt": ("admin", "IMPORT FOREIGN SCHEMA reads a remote server"),
    "CreatedbStmt": ("admin", "CREATE DATABASE creates a database"),
    "DropdbStmt": ("admin", "DROP DATABASE destroys a database"),
    "AlterDatabaseStmt": ("admin", "ALTER DATABASE changes a database"),
    "AlterDatabaseSetStmt": ("admin", "ALTER DATABASE ... SET changes a database's defaults"),
    "AlterDatabaseRefreshCollStmt": ("admin", "ALTER DATABASE changes a database"),
    "DropTableSpaceStmt": ("admin", "DROP TABLESPACE removes server storage"),
    "AlterTableSpaceOptionsStmt": ("admin", "ALTER TABLESPACE changes server storage"),
    "AlterTableMoveAllStmt": ("admin", "ALTER TABLESPACE MOVE rewrites relations"),
    "CreatePublicationStmt": ("admin", "CREATE PUBLICATION publishes data for replication"),
    "AlterPublicationStmt": ("admin", "ALTER PUBLICATION changes replicated data"),
    "CreateSubscriptionStmt": ("admin", "CREATE SUBSCRIPTION connects to another server"),
    "AlterSubscriptionStmt": ("admin", "ALTER SUBSCRIPTION changes replication"),
    "DropSubscriptionStmt": ("admin", "DROP SUBSCRIPTION changes replication"),
    # server file system
    "LoadStmt": ("file", "LOAD loads a shared library from the server's file system"),
    "CreateTableSpaceStmt": ("file", "CREATE TABLESPACE uses a server directory"),
}

#: DROP of these object types is riskier than a schema change.
DROP_CLASSES: Mapping[str, Entry] = {
    **_same("admin", "removes server-level code or configuration", """
        OBJECT_EXTENSION OBJECT_FOREIGN_SERVER OBJECT_FDW OBJECT_EVENT_TRIGGER
        OBJECT_PUBLICATION OBJECT_ACCESS_METHOD OBJECT_LANGUAGE
    """),
    "OBJECT_POLICY": ("privilege", "removes a row-level security policy"),
}

#: ALTER TABLE sub-commands that change who may see or own data.
ALTER_TABLE_PRIVILEGE_CMDS: Mapping[str, str] = {
    "AT_ChangeOwner": "ALTER ... OWNER TO changes ownership",
    "AT_EnableRowSecurity": "changes row-level security",
    "AT_DisableRowSecurity": "changes row-level security",
    "AT_ForceRowSecurity": "changes row-level security",
    "AT_NoForceRowSecurity": "changes row-level security",
}

#: Procedural languages whose functions the gateway accepts as plain schema changes.
TRUSTED_LANGUAGES: frozenset[str] = frozenset({"sql", "plpgsql"})

#: Languages whose functions are loaded from shared libraries on the server.
LIBRARY_LANGUAGES: frozenset[str] = frozenset({"c", "internal"})

# --- display names ----------------------------------------------------------------------------

#: Row-locking clause strengths, as written in SQL.
LOCK_STRENGTHS: Mapping[str, str] = {
    "LCS_FORUPDATE": "FOR UPDATE", "LCS_FORNOKEYUPDATE": "FOR NO KEY UPDATE",
    "LCS_FORSHARE": "FOR SHARE", "LCS_FORKEYSHARE": "FOR KEY SHARE",
}

#: Transaction statement kinds, as written in SQL.
TRANSACTION_COMMANDS: Mapping[str, str] = {
    "TRANS_STMT_BEGIN": "BEGIN", "TRANS_STMT_START": "START TRANSACTION",
    "TRANS_STMT_COMMIT": "COMMIT", "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_SAVEPOINT": "SAVEPOINT", "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK TO SAVEPOINT",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION", "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}

#: Command names for statement kinds whose name is not derived from the node name.
COMMANDS: Mapping[str, str] = {
    "InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE", "MergeStmt": "MERGE",
    "CopyStmt": "COPY", "DoStmt": "DO", "ExplainStmt": "EXPLAIN", "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE", "DeallocateStmt": "DEALLOCATE", "VariableShowStmt": "SHOW",
    "CallStmt": "CALL", "DeclareCursorStmt": "DECLARE CURSOR", "ClosePortalStmt": "CLOSE",
    "CheckPointStmt": "CHECKPOINT", "CreateStmt": "CREATE TABLE", "ViewStmt": "CREATE VIEW",
    "IndexStmt": "CREATE INDEX", "RuleStmt": "CREATE RULE", "CreateTrigStmt": "CREATE TRIGGER",
    "CreatedbStmt": "CREATE DATABASE", "DropdbStmt": "DROP DATABASE",
    "CreatePLangStmt": "CREATE LANGUAGE", "CreateFdwStmt": "CREATE FOREIGN DATA WRAPPER",
    "AlterFdwStmt": "ALTER FOREIGN DATA WRAPPER", "CreateForeignServerStmt": "CREATE SERVER",
    "AlterForeignServerStmt": "ALTER SERVER", "DefineStmt": "CREATE",
    "CompositeTypeStmt": "CREATE TYPE", "CreateEnumStmt": "CREATE TYPE",
    "CreateRangeStmt": "CREATE TYPE", "AlterEnumStmt": "ALTER TYPE",
    "CommentStmt": "COMMENT", "SecLabelStmt": "SECURITY LABEL", "RenameStmt": "ALTER",
    "AlterObjectSchemaStmt": "ALTER", "AlterOwnerStmt": "ALTER",
    "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW", "CreateAmStmt": "CREATE ACCESS METHOD",
    "CreateSeqStmt": "CREATE SEQUENCE", "AlterSeqStmt": "ALTER SEQUENCE",
    "CreateEventTrigStmt": "CREATE EVENT TRIGGER", "AlterEventTrigStmt": "ALTER EVENT TRIGGER",
    "CreateStatsStmt": "CREATE STATISTICS", "AlterStatsStmt": "ALTER STATISTICS",
    "CreateOpClassStmt": "CREATE OPERATOR CLASS", "CreateOpFamilyStmt": "CREATE OPERATOR FAMILY",
    "AlterOpFamilyStmt": "ALTER OPERATOR FAMILY", "ConstraintsSetStmt": "SET CONSTRAINTS",
}
