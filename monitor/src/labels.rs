//! The labels the monitor puts on containers, and reads back: they are the
//! only state of a container that survives a monitor restart besides the
//! state dir, so every decision can be rebuilt from them.

/// Label marking the monitor's addon containers.
pub const MANAGED_BY: &str = "oakestra.io/managed-by";
/// Its value on the monitor's addon containers.
pub const MANAGED_BY_VALUE: &str = "addons-monitor";
/// Label on an addon container: the installation it was made for.
pub const INSTALLATION: &str = "oakestra.io/installation-id";
/// Label on an addon container: its service's name in the addon.
pub const SERVICE: &str = "oakestra.io/service-name";
/// Label on every container the monitor creates: its plane.
pub const PLANE: &str = "oakestra.io/plane";
/// Label on an addon container: the addon's marketplace id.
pub const ADDON: &str = "oakestra.io/addon-id";
/// Label naming the core component a container is.
pub const CORE_COMPONENT: &str = "oakestra.io/core-component";
/// Label on containers the monitor runs from the static file.
pub const CORE_SOURCE: &str = "oakestra.io/core-source";
/// Value of [`CORE_SOURCE`] for static core components.
pub const CORE_SOURCE_STATIC: &str = "static";
/// Label on a static core container: hash of its entry in the file.
pub const CORE_SPEC_HASH: &str = "oakestra.io/core-spec-hash";
/// Label on a core container while an installation replaces it.
pub const REPLACED_BY: &str = "oakestra.io/replaced-by";
/// Label on an addon container: the core container it replaces.
pub const REPLACES: &str = "oakestra.io/replaces";
/// The installation release a container runs (absent: release 1).
pub const RELEASE: &str = "oakestra.io/release";
/// Label on an addon container the monitor gave up on: why. Kept beside the
/// container in containerd, so the give-up outlives a state dir that could
/// not be written when it was made (a full disk).
pub const GIVEN_UP: &str = "oakestra.io/given-up";
